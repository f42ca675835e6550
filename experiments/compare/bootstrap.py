"""How much of a box-AP difference the test images alone could make: COCO box AP for any multiset of
a test set's images, and the paired bootstrap over images built on it.

pycocotools matches a run's detections to the ground truth once (``COCOeval.evaluate``); AP over a
resample of the images then follows by weighting each image by how often it was drawn, which is
what ``accumulate`` would compute for a test set holding each image that many times (tested against
it on a duplicated ground truth). Box AP as COCOEvaluator reports it: IoU 0.50:0.95, all sizes, 100
detections per image, 101 recall points, categories without ground truth left out.
"""
import contextlib
import io

import numpy as np
from pycocotools.cocoeval import COCOeval

from frn_det.engine.coco_eval import load_results

_RECALLS = np.linspace(0.0, 1.0, 101)
_EPS = np.spacing(1)  # pycocotools' guard against 0 / 0


class ImageWeightedAP:
    """A run's box AP on ``gt`` (a pycocotools COCO) as a function of per-image weights."""

    def __init__(self, gt, results_file):
        ev = COCOeval(gt, load_results(gt, results_file, "bbox"), "bbox")
        ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [100]
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
        self.image_ids = list(ev.params.imgIds)
        self.category_ids = list(ev.params.catIds)
        n_img = len(self.image_ids)
        self._categories = [self._category(ev.evalImgs[k * n_img:(k + 1) * n_img]) for k in range(len(self.category_ids))]

    @staticmethod
    def _category(evals):
        """Detections of one category in pycocotools' order (score descending, ties in image order)."""
        scores, images, matched, ignored, positives = [], [], [], [], np.zeros(len(evals))
        for i, e in enumerate(evals):
            if e is None:
                continue
            scores.append(np.asarray(e["dtScores"][:100]))
            images.append(np.full(len(scores[-1]), i))
            matched.append(e["dtMatches"][:, :100] != 0)
            ignored.append(e["dtIgnore"][:, :100].astype(bool))
            positives[i] = np.count_nonzero(e["gtIgnore"] == 0)
        if not scores:
            return None
        order = np.argsort(-np.concatenate(scores), kind="mergesort")
        matched, ignored = np.concatenate(matched, axis=1)[:, order], np.concatenate(ignored, axis=1)[:, order]
        return {"image": np.concatenate(images)[order], "tp": matched & ~ignored, "fp": ~matched & ~ignored,
                "positives": positives}

    def ap(self, weights, chunk=64):
        """(AP, per-category AP), in %, for image weights of shape (B, images) (or (images,)): arrays
        (B,) and (B, categories), NaN where a resample has no ground truth of a category."""
        w = np.atleast_2d(np.asarray(weights, dtype=float))
        per_cat = np.full((len(w), len(self._categories)), np.nan)
        for k, cat in enumerate(self._categories):
            if cat is not None:
                for s in range(0, len(w), chunk):
                    per_cat[s:s + chunk, k] = _category_ap(cat, w[s:s + chunk])
        with np.errstate(invalid="ignore"), _quiet_nanmean():
            return np.nanmean(per_cat, axis=1) * 100, per_cat * 100

    def __call__(self, weights):
        return self.ap(weights)[0]


@contextlib.contextmanager
def _quiet_nanmean():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
        yield


def _category_ap(cat, w):
    """Mean over IoU thresholds and recall points of the interpolated precision, per row of ``w``."""
    dw = w[:, cat["image"]][:, None, :]  # (B, 1, D): each detection weighted by its image
    tp, fp = np.cumsum(dw * cat["tp"], axis=2), np.cumsum(dw * cat["fp"], axis=2)  # (B, T, D)
    positives = w @ cat["positives"]  # (B,)
    out = np.full(len(w), np.nan)
    for b in np.flatnonzero(positives > 0):
        recall, precision = tp[b] / positives[b], tp[b] / (tp[b] + fp[b] + _EPS)
        precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # the envelope from the right
        aps = []
        for rc, pr in zip(recall, precision):
            idx = np.searchsorted(rc, _RECALLS, side="left")
            aps.append(np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)], 0.0).mean() if len(pr) else 0.0)
        out[b] = np.mean(aps)
    return out


def resample_weights(n_images, n_resamples=2000, seed=0):
    """(n_resamples, n_images) counts: each row draws n_images images with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_resamples).astype(float)


def paired_bootstrap(ap_a, ap_b, weights):
    """{"a", "b", "diff"}: each a dict of the observed value, the bootstrap std and the 2.5/97.5%
    percentiles, for ``ap_a`` and ``ap_b`` (ImageWeightedAP of two runs on the same test set) over
    the same resampled ``weights``."""
    if ap_a.image_ids != ap_b.image_ids:
        raise ValueError("the two runs were evaluated on different images")
    ones = np.ones((1, len(ap_a.image_ids)))
    a, b = ap_a(weights), ap_b(weights)
    out = {}
    for key, values, observed in (("a", a, ap_a(ones)[0]), ("b", b, ap_b(ones)[0]),
                                  ("diff", a - b, ap_a(ones)[0] - ap_b(ones)[0])):
        out[key] = {"observed": float(observed), "std": float(np.std(values, ddof=1)),
                    "ci": tuple(float(v) for v in np.percentile(values, [2.5, 97.5]))}
    return out

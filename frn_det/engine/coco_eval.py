"""COCO evaluation of a saved results json (what detectron2's COCOEvaluator writes) against COCO
ground truth with pycocotools, with input errors that name the file at fault."""
import contextlib
import io
import json

import numpy as np

from .results import COCO_METRICS as METRICS


class EvalInputError(ValueError):
    """A ground-truth or results file that cannot be evaluated; the message names the file."""


def _load_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvalInputError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{what} file {path} is not valid JSON: {e}") from None


def load_ground_truth(path):
    from pycocotools.coco import COCO

    data = _load_json(path, "ground-truth")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise EvalInputError(f"ground-truth file {path} is not a COCO instances file: it needs 'images', "
                             "'annotations' and 'categories' lists")
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        gt.createIndex()
    return gt


def load_results(gt, path, iou_type):
    results = _load_json(path, "results")
    key = "bbox" if iou_type == "bbox" else "segmentation"
    if not isinstance(results, list):
        raise EvalInputError(f"results file {path} must hold a list of detections, got {type(results).__name__}")
    if not results:
        raise EvalInputError(f"results file {path} holds no detections")
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "score", key) if not isinstance(r, dict) or k not in r]
        if missing:
            raise EvalInputError(f"results file {path}: detection {i} lacks {missing} (needed for --iou-type {iou_type})")
    unknown_images = {r["image_id"] for r in results} - set(gt.getImgIds())
    if unknown_images:
        raise EvalInputError(f"results file {path} has image ids not in the ground truth: {sorted(unknown_images)[:10]}")
    unknown_cats = {r["category_id"] for r in results} - set(gt.getCatIds())
    if unknown_cats:
        raise EvalInputError(f"results file {path} has category ids not in the ground truth: {sorted(unknown_cats)}")
    if iou_type == "segm":
        # With a "bbox" field loadRes takes the box area as the instance area, which changes what
        # counts as small/medium/large; detectron2's COCOEvaluator drops it for mask AP too.
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        return gt.loadRes(results)


def evaluate(gt_path, results_path, iou_type="bbox"):
    """Runs COCOeval, prints its table and per-category AP; returns {metric: AP in %}."""
    from pycocotools.cocoeval import COCOeval

    gt = load_ground_truth(gt_path)
    dt = load_results(gt, results_path, iou_type)
    ev = COCOeval(gt, dt, iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = {m: float(s * 100) if s >= 0 else float("nan") for m, s in zip(METRICS, ev.stats)}
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]
    precision = ev.eval["precision"][:, :, :, 0, -1]
    print("\nPer-category AP:")
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        ap = float(np.mean(p[p > -1]) * 100) if (p > -1).any() else float("nan")
        print(f"  {gt.cats[cat_id]['name']:<20s} {ap:6.2f}")
    print("\n" + " | ".join(f"{m}: {stats[m]:.2f}" for m in METRICS))
    return stats

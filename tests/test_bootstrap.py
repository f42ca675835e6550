"""experiments/compare/bootstrap.py: box AP for weighted images equals pycocotools' on the test set
those weights describe (each image that many times), and the paired bootstrap built on it; the
decision rule of experiments/bccd/plan.md (experiments/bccd/report.verdict)."""
import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from experiments.bccd.report import verdict
from experiments.compare.bootstrap import ImageWeightedAP, paired_bootstrap, resample_weights
from frn_det.engine.coco_eval import load_ground_truth, load_results


def scene(n_images=6, seed=0):
    """Ground truth of 3 categories (the third without objects) with a crowd region, and detections
    with misses, false positives, duplicates and tied scores; as (gt dict, detections)."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(n_images):
        images.append({"id": f"img{i}", "width": 100, "height": 100, "file_name": f"{i}.jpg"})
        for k in range(int(rng.integers(1, 4))):
            x, y, s = (float(v) for v in rng.uniform(0, 60, 3))
            cat = int(rng.integers(1, 3))
            anns.append({"id": len(anns) + 1, "image_id": f"img{i}", "category_id": cat, "bbox": [x, y, s + 10, s + 10],
                         "area": (s + 10) ** 2, "iscrowd": int(k == 2)})
            if rng.random() < 0.8:  # found, with jitter; sometimes twice
                for _ in range(1 + int(rng.random() < 0.3)):
                    j = rng.normal(0, 3, 4)
                    dets.append({"image_id": f"img{i}", "category_id": cat, "score": round(float(rng.random()), 1),
                                 "bbox": [x + j[0], y + j[1], s + 10 + j[2], s + 10 + j[3]]})
        for _ in range(int(rng.integers(0, 3))):  # false positives
            dets.append({"image_id": f"img{i}", "category_id": int(rng.integers(1, 4)), "score": float(rng.random()),
                         "bbox": [float(v) for v in rng.uniform(0, 80, 2)] + [10.0, 10.0]})
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def coco_ap(gt_file, dets_file):
    gt = load_ground_truth(gt_file)
    ev = COCOeval(gt, load_results(gt, dets_file, "bbox"), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return ev.stats[0] * 100


def test_unit_weights_give_pycocotools_ap(tmp_path):
    gt, dets = scene()
    gt_file, dets_file = write(tmp_path, "gt.json", gt), write(tmp_path, "dt.json", dets)
    model = ImageWeightedAP(load_ground_truth(gt_file), dets_file)
    ap, per_category = model.ap(np.ones(len(model.image_ids)))
    assert ap[0] == pytest.approx(coco_ap(gt_file, dets_file), abs=1e-10)
    assert math.isnan(per_category[0, 2])  # the category without ground truth is left out, as COCO does


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_equal_a_test_set_holding_each_image_that_often(tmp_path, seed):
    gt, dets = scene(seed=seed)
    counts = np.random.default_rng(seed).integers(0, 4, len(gt["images"]))
    counts[0] = max(counts[0], 1)
    # the test set the weights describe: image i `counts[i]` times, under new ids, with its detections
    big = {"images": [], "annotations": [], "categories": gt["categories"]}
    big_dets = []
    for i, img in enumerate(gt["images"]):
        for c in range(counts[i]):
            new = f"{img['id']}#{c}"
            big["images"].append(dict(img, id=new))
            big["annotations"] += [dict(a, id=len(big["annotations"]) + 1 + j, image_id=new)
                                   for j, a in enumerate(a for a in gt["annotations"] if a["image_id"] == img["id"])]
            big_dets += [dict(d, image_id=new) for d in dets if d["image_id"] == img["id"]]
    expected = coco_ap(write(tmp_path, "big_gt.json", big), write(tmp_path, "big_dt.json", big_dets))
    model = ImageWeightedAP(load_ground_truth(write(tmp_path, "gt.json", gt)), write(tmp_path, "dt.json", dets))
    # weights in the model's image order (pycocotools' sorted ids); copies of an image with tied
    # scores are one weighted step here and adjacent steps there: the interpolated precision is the same
    order = [next(i for i, img in enumerate(gt["images"]) if img["id"] == iid) for iid in model.image_ids]
    assert model(counts[order].astype(float)[None])[0] == pytest.approx(expected, abs=1e-9)


def test_paired_bootstrap_of_a_run_against_itself_and_another(tmp_path):
    gt, dets = scene(n_images=12)
    gtc = load_ground_truth(write(tmp_path, "gt.json", gt))
    a = ImageWeightedAP(gtc, write(tmp_path, "a.json", dets))
    worse = [dict(d, score=d["score"] * 0.5) if i % 3 == 0 else d for i, d in enumerate(dets)]
    b = ImageWeightedAP(gtc, write(tmp_path, "b.json", worse))
    w = resample_weights(len(a.image_ids), 300, seed=1)
    same = paired_bootstrap(a, a, w)
    assert same["diff"]["std"] == 0 and same["diff"]["observed"] == 0 and same["a"]["std"] > 0
    other = paired_bootstrap(a, b, w)
    assert other["diff"]["observed"] == pytest.approx(other["a"]["observed"] - other["b"]["observed"])
    assert other["diff"]["ci"][0] <= other["diff"]["observed"] <= other["diff"]["ci"][1]
    assert np.all(w.sum(axis=1) == len(a.image_ids))


def test_decision_rule():
    # ahead: mean 4 against SE sqrt(1/2 + 1) = 1.22
    assert verdict([4.0, 4.0 + math.sqrt(2)], 1.0)[3] == "ahead"
    assert verdict([-5.0, -4.0], 1.0)[3] == "behind"
    mean, n_seed, se, reading = verdict([1.0, 2.0], 1.0)  # |1.5| < 2 SE with two seeds: a third one
    assert reading == "needs seed 2" and se == pytest.approx(math.sqrt(0.5 ** 2 + 1.0))
    assert verdict([1.0, 2.0, 1.5], 1.0)[3] == "tie"
    assert verdict([3.0], 0.5)[3] == "needs seed 1"

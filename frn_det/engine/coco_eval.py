"""COCO evaluation of a saved results json (what detectron2's COCOEvaluator writes) against COCO
ground truth with pycocotools, with input errors that name the file at fault; and an error analysis
that splits a detector's AP into finding objects and naming them (class-agnostic AP, and what each
ground-truth class is detected as)."""
import contextlib
import io
import json
import math

import numpy as np

from .plotting import figure
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


def per_category_ap(ev, area_range=0):
    """AP (%) of each category of an accumulated COCOeval, in ev.params.catIds order (NaN: none), for
    its ``area_range``-th area range (0: all sizes)."""
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]
    precision = ev.eval["precision"][:, :, :, area_range, -1]
    return [float(np.mean(p[p > -1]) * 100) if (p > -1).any() else float("nan")
            for p in np.moveaxis(precision, 2, 0)]


def _percent(stat):
    """A COCOeval stat in %, NaN where COCO could not compute it (-1)."""
    return float(stat * 100) if stat >= 0 else float("nan")


def _cocoeval(gt, dt, iou_type, use_cats=True, quiet=True, area_ranges=None, cat_ids=None):
    """An evaluated, accumulated and summarised COCOeval (its table printed unless ``quiet``). With
    ``area_ranges`` ({label: [min, max] area}, all sizes first) instead of COCO's small / medium /
    large, it is not summarised (COCO's summary looks its own ranges up); ``cat_ids``: only those
    categories."""
    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(gt, dt, iou_type)
    ev.params.useCats = int(use_cats)
    if cat_ids is not None:
        ev.params.catIds = list(cat_ids)
    if area_ranges:
        ev.params.areaRngLbl, ev.params.areaRng = list(area_ranges), list(area_ranges.values())
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        ev.evaluate()
        ev.accumulate()
        if not area_ranges:
            ev.summarize()
    return ev


def evaluate(gt_path, results_path, iou_type="bbox"):
    """Runs COCOeval, prints its table and per-category AP; returns {metric: AP in %} with COCO's 12
    metrics and "AP-<category name>" per category, as detectron2's COCOEvaluator names them."""
    gt = load_ground_truth(gt_path)
    dt = load_results(gt, results_path, iou_type)
    ev = _cocoeval(gt, dt, iou_type, quiet=False)
    stats = {m: _percent(s) for m, s in zip(METRICS, ev.stats)}
    print("\nPer-category AP:")
    for cat_id, ap in zip(ev.params.catIds, per_category_ap(ev)):
        print(f"  {gt.cats[cat_id]['name']:<20s} {ap:6.2f}")
        stats[f"AP-{gt.cats[cat_id]['name']}"] = ap
    print("\n" + " | ".join(f"{m}: {stats[m]:.2f}" for m in METRICS))
    return stats


def class_agnostic_ap(gt, dt, iou_type="bbox"):
    """COCO AP (%) with categories ignored: a detection may match a ground-truth object of any class.
    Its gap to the ordinary AP is what misnamed classes cost."""
    return _percent(_cocoeval(gt, dt, iou_type, use_cats=False).stats[0])


SIZE_BINS = ("smallest 1/4", "middle 1/2", "largest 1/4")


def size_quartile_ranges(gt, category_id=None):
    """{bin: [min, max] area} splitting the ground truth's objects (crowd excluded; of one category
    when ``category_id`` is given) by their own area quartiles into SIZE_BINS (areas up to q1, above
    q1 up to q3, above q3), after "all": sizes relative to the dataset (or class), where COCO's fixed
    32^2 / 96^2 bounds would put a small-image dataset's objects all in one bin. None without objects."""
    areas = [a["area"] for a in gt.dataset["annotations"]
             if not a.get("iscrowd", 0) and category_id in (None, a["category_id"])]
    if not areas:
        return None
    q1, q3 = (float(q) for q in np.percentile(areas, [25, 75]))
    # COCOeval keeps objects with min <= area <= max: a bin starts just above the one below it
    return {"all": [0.0, 1e10], SIZE_BINS[0]: [0.0, q1], SIZE_BINS[1]: [float(np.nextafter(q1, np.inf)), q3],
            SIZE_BINS[2]: [float(np.nextafter(q3, np.inf)), 1e10]}


def category_ap_by_size(gt, dt, iou_type="bbox"):
    """(area ranges, AP (%) array (categories in gt.getCatIds() order, SIZE_BINS)): where in the size
    range a detector loses, per class. Without objects: (None, NaN)."""
    ranges = size_quartile_ranges(gt)
    if ranges is None:
        return None, np.full((len(gt.getCatIds()), len(SIZE_BINS)), np.nan)
    ev = _cocoeval(gt, dt, iou_type, area_ranges=ranges)
    return ranges, np.array([per_category_ap(ev, a) for a in range(1, len(ranges))]).T


def category_ap_by_class_size(gt, dt, iou_type="bbox"):
    """(area ranges per category, AP (%) array (categories in gt.getCatIds() order, SIZE_BINS)): each
    class split by its own area quartiles, where a dataset's quartiles put a class that is smaller or
    larger than the rest all in one bin (BCCD's platelets and white cells)."""
    ranges, rows = [], []
    for cat in gt.getCatIds():
        r = size_quartile_ranges(gt, cat)
        ranges.append(r)
        if r is None:
            rows.append([math.nan] * len(SIZE_BINS))
            continue
        ev = _cocoeval(gt, dt, iou_type, area_ranges=r, cat_ids=[cat])
        rows.append([per_category_ap(ev, a)[0] for a in range(1, len(r))])
    return ranges, np.array(rows)


def confusion_matrix(gt, dt, score_thresh=0.3, iou_thresh=0.5):
    """What each ground-truth object is detected as, on boxes.

    Returns (category names, counts (K, K + 1)): row k is the ground-truth category gt.getCatIds()[k];
    column j < K counts its objects whose best-scoring detection of score >= ``score_thresh`` and
    box IoU >= ``iou_thresh`` (any class, crowd objects excluded) is of category j, column K those
    that no such detection covers ("missed"). A per-object diagnostic: one detection may cover two
    objects, unlike AP's one-to-one matching.
    """
    cat_ids = gt.getCatIds()
    col = {c: j for j, c in enumerate(cat_ids)}
    counts = np.zeros((len(cat_ids), len(cat_ids) + 1), dtype=np.int64)
    for img in gt.getImgIds():
        objects = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[img])) if not a.get("iscrowd", 0)]
        if not objects:
            continue
        dets = [d for d in dt.loadAnns(dt.getAnnIds(imgIds=[img])) if d["score"] >= score_thresh]
        best = best_detections([d["bbox"] for d in dets], [d["score"] for d in dets], [a["bbox"] for a in objects],
                               iou_thresh)
        for a, k in zip(objects, best):
            counts[col[a["category_id"]], col[dets[k]["category_id"]] if k >= 0 else len(cat_ids)] += 1
    return [gt.cats[c]["name"] for c in cat_ids], counts


def best_detections(det_boxes, scores, gt_boxes, iou_thresh=0.5):
    """For each ground-truth box (COCO xywh), the index of the highest-scoring detection box whose IoU
    with it is >= ``iou_thresh``, -1 where none is: what the object is "detected as"."""
    from pycocotools import mask as mask_util

    best = np.full(len(gt_boxes), -1)
    if len(det_boxes) and len(gt_boxes):
        iou = mask_util.iou(np.asarray(det_boxes, dtype=np.float64), np.asarray(gt_boxes, dtype=np.float64),
                            [0] * len(gt_boxes))
        scores = np.asarray(scores)
        for i in range(len(gt_boxes)):
            hits = np.flatnonzero(iou[:, i] >= iou_thresh)
            if hits.size:
                best[i] = hits[np.argmax(scores[hits])]
    return best


def error_analysis(gt_path, results_path, iou_type="bbox", score_thresh=0.3):
    """{"AP", "class_agnostic_AP", "categories", "category_AP", "size_ranges", "category_AP_by_size",
    "confusion", "score_thresh"} of one results file (see above)."""
    gt = load_ground_truth(gt_path)
    dt = load_results(gt, results_path, iou_type)
    ev = _cocoeval(gt, dt, iou_type)
    names, counts = confusion_matrix(gt, dt, score_thresh)
    ranges, by_size = category_ap_by_size(gt, dt, iou_type)
    class_ranges, by_class_size = category_ap_by_class_size(gt, dt, iou_type)
    return {"AP": _percent(ev.stats[0]), "class_agnostic_AP": class_agnostic_ap(gt, dt, iou_type),
            "categories": names, "category_AP": per_category_ap(ev), "size_ranges": ranges,
            "category_AP_by_size": by_size, "class_size_ranges": class_ranges,
            "category_AP_by_class_size": by_class_size, "confusion": counts, "score_thresh": score_thresh}


def format_confusion(analysis):
    """The confusion counts as a markdown table (rows: ground truth, columns: detected as)."""
    names = analysis["categories"]
    lines = ["| ground truth | " + " | ".join(names) + " | missed | correct | AP |",
             "|---" * (len(names) + 4) + "|"]
    for k, (name, row, ap) in enumerate(zip(names, analysis["confusion"], analysis["category_AP"])):
        total = int(row.sum())
        correct = f"{100 * row[k] / total:.0f}%" if total else "n/a"
        lines.append(f"| {name} | " + " | ".join(str(int(v)) for v in row) + f" | {correct} | {ap:.1f} |")
    return "\n".join(lines)


def format_ap_by_size(analysis):
    """AP per category and object size (the ground truth's area quartiles) as a markdown table."""
    heads = list(SIZE_BINS)
    if analysis["size_ranges"] is not None:
        (_, q1), (_, q3) = analysis["size_ranges"][SIZE_BINS[0]], analysis["size_ranges"][SIZE_BINS[1]]
        heads = [f"{SIZE_BINS[0]} (area <= {q1:.0f})", SIZE_BINS[1], f"{SIZE_BINS[2]} (area > {q3:.0f})"]
    lines = ["| category | AP | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
    for name, ap, row in zip(analysis["categories"], analysis["category_AP"], analysis["category_AP_by_size"]):
        lines.append(f"| {name} | {ap:.1f} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines)


def format_ap_by_class_size(analysis):
    """AP per category on its own smallest quarter, middle half and largest quarter (by area, with
    each class's quartiles in px²) as a markdown table."""
    lines = ["| category | AP | " + " | ".join(SIZE_BINS) + " | class's area quartiles q1 / q3 |",
             "|---" * (len(SIZE_BINS) + 3) + "|"]
    for name, ap, row, r in zip(analysis["categories"], analysis["category_AP"], analysis["category_AP_by_class_size"],
                                analysis["class_size_ranges"]):
        bounds = "n/a" if r is None else f"{r[SIZE_BINS[0]][1]:.0f} / {r[SIZE_BINS[1]][1]:.0f}"
        lines.append(f"| {name} | {ap:.1f} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {bounds} |")
    return "\n".join(lines)


def plot_confusions(analyses, labels, path):
    """One heat map per results file (rows: ground truth, shares of the row; counts written in)."""
    with figure(path, ncols=len(analyses), panel_size=(3.6, 3.6), extra_width=0.6) as (_, axes):
        for ax, a, label in zip(axes[0], analyses, labels):
            _confusion_panel(ax, a, label)
        axes[0][0].set_ylabel("ground truth", fontsize=8)


def _confusion_panel(ax, a, label):
    counts = a["confusion"]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(counts):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(counts.shape[1]), a["categories"] + ["missed"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(counts.shape[0]), a["categories"], fontsize=8)
    ax.set_title(f"{label}\nAP {a['AP']:.1f}, class-agnostic {a['class_agnostic_AP']:.1f}", fontsize=9)
    ax.set_xlabel(f"detected as (score >= {a['score_thresh']:g}, IoU >= 0.5)", fontsize=8)

"""frn_det.engine.coco_eval's error analysis (class-agnostic AP, class confusion) and tools/coco_eval.py
--errors on hand-made ground truth and detections whose answers are known."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from frn_det.engine import coco_eval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (image id, category id, [x, y, w, h], iscrowd)
OBJECTS = [(1, 1, [0, 0, 10, 10], 0), (1, 2, [20, 20, 10, 10], 0), (2, 1, [0, 0, 20, 20], 0),
           (2, 2, [30, 30, 6, 6], 1)]


@pytest.fixture
def gt_path(tmp_path):
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": [{"id": k + 1, "image_id": img, "category_id": cat, "bbox": box, "iscrowd": crowd,
                             "area": box[2] * box[3]} for k, (img, cat, box, crowd) in enumerate(OBJECTS)]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return str(path)


def write_results(tmp_path, dets, name="res.json"):
    path = tmp_path / name
    path.write_text(json.dumps([{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in dets]))
    return str(path)


def test_perfect_and_misnamed_detections(gt_path, tmp_path):
    """Exact boxes with the right classes: AP 100 either way; the same boxes with the classes swapped:
    AP 0, yet class-agnostic AP 100 (every object found, none named), and the confusion says so."""
    truth = [(img, cat, box, 0.9) for img, cat, box, crowd in OBJECTS if not crowd]
    right = coco_eval.error_analysis(gt_path, write_results(tmp_path, truth, "right.json"))
    assert right["AP"] == pytest.approx(100) and right["class_agnostic_AP"] == pytest.approx(100)
    np.testing.assert_array_equal(right["confusion"], [[2, 0, 0], [0, 1, 0]])
    assert right["category_AP"] == pytest.approx([100, 100])
    swapped = [(img, 3 - cat, box, s) for img, cat, box, s in truth]
    wrong = coco_eval.error_analysis(gt_path, write_results(tmp_path, swapped, "wrong.json"))
    assert wrong["AP"] == pytest.approx(0) and wrong["class_agnostic_AP"] == pytest.approx(100)
    np.testing.assert_array_equal(wrong["confusion"], [[0, 2, 0], [1, 0, 0]])


def test_confusion_rules(gt_path, tmp_path):
    """Each object takes the class of its best-scoring covering detection above the score threshold;
    a detection that misses the box (IoU < 0.5) or scores below the threshold leaves it missed;
    crowd objects are not counted."""
    dets = [(1, 2, [0, 0, 10, 10], 0.9), (1, 1, [0, 0, 10, 10], 0.5),  # a, best detection says b
            (1, 2, [20, 20, 10, 10], 0.2),                                # b, only below the threshold
            (2, 1, [10, 10, 20, 20], 0.9),                                # a, IoU 1/7 with its box
            (2, 1, [30, 30, 6, 6], 0.9)]                                  # on the crowd object
    a = coco_eval.error_analysis(gt_path, write_results(tmp_path, dets))
    assert a["categories"] == ["a", "b"]
    np.testing.assert_array_equal(a["confusion"], [[0, 1, 1], [0, 0, 1]])
    low = coco_eval.error_analysis(gt_path, write_results(tmp_path, dets), score_thresh=0.1)
    np.testing.assert_array_equal(low["confusion"], [[0, 1, 1], [0, 1, 0]])
    table = coco_eval.format_confusion(a)
    assert "| a | 0 | 1 | 1 | 0% |" in table and "| b | 0 | 0 | 1 | 0% |" in table


def test_tool_errors_and_plot(gt_path, tmp_path):
    truth = [(img, cat, box, 0.9) for img, cat, box, crowd in OBJECTS if not crowd]
    results = [write_results(tmp_path, truth, "one.json"),
               write_results(tmp_path, [(i, 3 - c, b, s) for i, c, b, s in truth], "two.json")]
    tool = os.path.join(REPO, "tools", "coco_eval.py")
    png = tmp_path / "confusion.png"
    proc = subprocess.run([sys.executable, tool, gt_path, *results, "--errors", "--labels", "good", "swapped",
                           "--plot", str(png)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "good: AP 100.00, class-agnostic AP 100.00" in proc.stdout
    assert "swapped: AP 0.00, class-agnostic AP 100.00" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for argv, message in [([*results], "need --errors"), ([*results, "--errors", "--labels", "x"], "--labels names 1")]:
        proc = subprocess.run([sys.executable, tool, gt_path, *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr


def test_ap_by_size_uses_the_datasets_own_quartiles(tmp_path):
    """Eight objects of areas 16..121, one per image: the smallest quarter is {16, 25}, the largest
    {100, 121}. Detections exact, but the two largest named wrongly: AP 100 on the small and middle
    bins of both classes, 0 on the largest."""
    sides = {1: (4, "a"), 2: (5, "b"), 3: (6, "a"), 4: (7, "b"), 5: (8, "a"), 6: (9, "b"), 7: (10, "a"), 8: (11, "b")}
    cat = {"a": 1, "b": 2}
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in sides],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": [{"id": i, "image_id": i, "category_id": cat[c], "bbox": [1, 1, s, s], "iscrowd": 0,
                             "area": s * s} for i, (s, c) in sides.items()]}
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(data))
    dets = [(i, cat[c] if s < 10 else 3 - cat[c], [1, 1, s, s], 0.9) for i, (s, c) in sides.items()]
    a = coco_eval.error_analysis(str(gt), write_results(tmp_path, dets))
    assert a["size_ranges"]["smallest 1/4"][1] == pytest.approx(33.25)  # numpy's linear quartile of the areas
    assert a["size_ranges"]["largest 1/4"][0] == pytest.approx(85.75)
    np.testing.assert_allclose(a["category_AP_by_size"], [[100, 100, 0], [100, 100, 0]])
    table = coco_eval.format_ap_by_size(a)
    assert "| smallest 1/4 (area <= 33) | middle 1/2 | largest 1/4 (area > 86) |" in table
    assert "| a | 75.2 | 100.0 | 100.0 | 0.0 |" in table  # all sizes: 3 of 4 found, then a false positive


def _one_class_gt(tmp_path, sides, crowd=()):
    """One object of class "a" per image, square sides ``sides``; images listed in ``crowd`` are crowd."""
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in range(1, len(sides) + 1)],
            "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, s, s], "area": s * s,
                             "iscrowd": int(i in crowd)} for i, s in enumerate(sides, 1)]}
    path = tmp_path / "gt_one_class.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_an_object_on_a_quartile_is_in_one_size_bin(tmp_path):
    """Areas 16, 25, 36, 49, 64: the quartiles are 25 and 49, themselves areas. The object of area 25
    belongs to the smallest quarter only: missing it costs the smallest bin, not the middle one."""
    sides = [4, 5, 6, 7, 8]
    gt = _one_class_gt(tmp_path, sides)
    dets = [(i, 1, [1, 1, s, s], 0.9) for i, s in enumerate(sides, 1) if s != 5]
    a = coco_eval.error_analysis(gt, write_results(tmp_path, dets))
    assert a["size_ranges"]["smallest 1/4"][1] == 25 and 25 < a["size_ranges"]["middle 1/2"][0] < 25.001
    small, middle, large = a["category_AP_by_size"][0]
    assert small < 100 and middle == pytest.approx(100) and large == pytest.approx(100)


def test_ground_truth_without_objects_has_no_size_bins(tmp_path):
    """Only a crowd object: no size bins (n/a in the table), no crash."""
    gt = _one_class_gt(tmp_path, [6], crowd=(1,))
    a = coco_eval.error_analysis(gt, write_results(tmp_path, [(1, 1, [1, 1, 6, 6], 0.9)]))
    assert a["size_ranges"] is None and np.isnan(a["category_AP_by_size"]).all()
    assert "| a | nan | nan | nan | nan |" in coco_eval.format_ap_by_size(a)

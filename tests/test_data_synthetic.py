"""The synthetic COCO generator, make_synthetic_coco.py and dataset registration with clear errors."""
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import frn_det  # noqa: F401  (registers the synthetic datasets)
from detectron2.data import DatasetCatalog, MetadataCatalog
from frn_det.data import check_registered, register_coco_dataset, register_synthetic, uses_rle_masks
from frn_det.data.synthetic import CLASSES, SyntheticSpec, generate, render_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small images with the occlusion of the original generator (any), so that occlusion is tested.
SPEC = SyntheticSpec(num_train=12, num_val=4, image_size=64, min_size=8, max_size=21, max_occlusion=1.0,
                     inside=False, max_objects=5, seed=3)


@pytest.fixture(scope="module")
def polygon_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("poly"))
    generate(SPEC, root, progress=False)
    return root


@pytest.fixture(scope="module")
def rle_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rle"))
    generate(SyntheticSpec(**{**SPEC.__dict__, "mask_format": "rle"}), root, progress=False)
    return root


def _json(root, split="train"):
    with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
        return json.load(f)


def _decode(ann, h, w):
    segm = ann["segmentation"]
    rle = mask_util.merge(mask_util.frPyObjects(segm, h, w)) if isinstance(segm, list) else segm
    return mask_util.decode(rle).astype(bool)


def test_generator_is_deterministic_by_seed(polygon_root, tmp_path):
    again = str(tmp_path / "again")
    generate(SPEC, again, progress=False)
    for split in ("train", "val"):
        assert _json(again, split) == _json(polygon_root, split)
        for name in sorted(os.listdir(os.path.join(polygon_root, split))):
            with open(os.path.join(polygon_root, split, name), "rb") as a, open(os.path.join(again, split, name), "rb") as b:
                assert a.read() == b.read(), name
    other = SyntheticSpec(**{**SPEC.__dict__, "seed": 4})
    assert not np.array_equal(render_image(other, "train", 0)[0], render_image(SPEC, "train", 0)[0])
    # An image does not depend on how many images come before it.
    assert np.array_equal(render_image(SyntheticSpec(**{**SPEC.__dict__, "num_train": 1}), "train", 5)[0],
                          render_image(SPEC, "train", 5)[0])


@pytest.mark.parametrize("root_fixture", ["polygon_root", "rle_root"])
def test_masks_boxes_areas_agree(root_fixture, request):
    data = _json(request.getfixturevalue(root_fixture))
    imgs = {i["id"]: i for i in data["images"]}
    assert [c["name"] for c in data["categories"]] == list(CLASSES)
    assert len(data["annotations"]) >= len(data["images"])
    for ann in data["annotations"]:
        img = imgs[ann["image_id"]]
        mask = _decode(ann, img["height"], img["width"])
        assert ann["iscrowd"] == 0
        assert ann["area"] == mask.sum() > 0
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


def test_rle_masks_are_the_visible_parts(rle_root):
    """RLE masks are exact: each is its painted shape minus the shapes painted after it (also
    minus shapes whose own visible part was too small to annotate, hence a subset check)."""
    data = _json(rle_root)
    occluded = 0
    for img in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        _, objects = render_image(SPEC, "train", img["id"] - 1)
        assert [c for c, _, _ in objects] == [a["category_id"] for a in anns]
        for i, (ann, (_, visible, painted)) in enumerate(zip(anns, objects)):
            later = np.zeros_like(painted)
            for _, _, p in objects[i + 1 :]:
                later |= p
            assert np.array_equal(_decode(ann, 64, 64), visible)
            assert not (visible & ~(painted & ~later)).any()
            occluded += int(not np.array_equal(visible, painted))
    assert occluded > 0


def test_processes_generating_one_root_take_turns(tmp_path):
    """While one process holds the root's generation lock, another's generate() waits and then finds
    the dataset made (no image rewritten under a reader)."""
    import fcntl
    import threading

    from frn_det.data.synthetic import LOCK_FILE, is_generated

    spec, root = SyntheticSpec(num_train=2, num_val=1, image_size=64, min_size=8, max_size=21, seed=5), tmp_path / "d"
    root.mkdir()
    with open(root / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(target=generate, args=(spec, str(root)), kwargs={"progress": False})
        waiting.start()
        waiting.join(timeout=2)
        assert waiting.is_alive() and not is_generated(str(root), spec)  # it waits for the holder
        (root / "train").mkdir()  # the holder is half way through
        png = root / "train" / "000000.png"
        png.write_bytes(b"written by the holder")
    waiting.join(timeout=60)
    assert not waiting.is_alive() and is_generated(str(root), spec)
    assert png.read_bytes() != b"written by the holder"  # generated after the holder let go


def test_sizes_span_min_to_max_size():
    spec = SyntheticSpec(num_train=60, image_size=96, min_size=8, max_size=32, inside=False, max_occlusion=1.0, seed=0)
    sides = [max(np.ptp(np.nonzero(m)[0]), np.ptp(np.nonzero(m)[1])) + 1
             for i in range(60) for _, m, _ in render_image(spec, "train", i)[1]]
    assert min(sides) <= 10 and max(sides) <= 32 + 2 and max(sides) >= 24


def test_default_task_keeps_objects_inside_and_occlusion_bounded():
    spec = SyntheticSpec(num_train=40)
    for i in range(40):
        _, objects = render_image(spec, "train", i)
        assert 1 <= len(objects) <= spec.max_objects
        for _, visible, painted in objects:
            ys, xs = np.nonzero(painted)
            assert max(np.ptp(ys), np.ptp(xs)) + 1 <= spec.max_size + 2
            # each later object hides at most max_occlusion of its visible pixels at placement time
            hidden = painted.sum() - visible.sum()
            assert hidden <= (spec.max_objects - 1) * spec.max_occlusion * painted.sum() + 1


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="max_occlusion"):
        SyntheticSpec(max_occlusion=0)
    with pytest.raises(ValueError, match="min_size <= max_size"):
        SyntheticSpec(min_size=30, max_size=20)


def test_pycocotools_loads_and_scores_ground_truth_as_perfect(polygon_root):
    gt = COCO(os.path.join(polygon_root, "annotations", "instances_val.json"))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.dataset["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_make_synthetic_coco_cli(tmp_path):
    tool = os.path.join(REPO, "tools", "make_synthetic_coco.py")
    argv = ["--root", str(tmp_path), "--num-train", "3", "--num-val", "2", "--image-size", "48", "--min-size", "8",
            "--max-size", "16", "--no-inside", "--mask-format", "rle"]
    subprocess.run([sys.executable, tool, *argv], check=True, capture_output=True)
    assert len(COCO(str(tmp_path / "annotations" / "instances_train.json")).imgs) == 3
    again = subprocess.run([sys.executable, tool, *argv], capture_output=True, text=True)
    assert again.returncode == 0 and "already holds this dataset" in again.stdout
    bad = subprocess.run([sys.executable, tool, *argv, "--image-size", "12"], capture_output=True, text=True)
    assert bad.returncode == 2 and "too small" in bad.stderr


def test_synthetic_names_registered_and_missing_data_says_how_to_generate(tmp_path):
    assert {"frn_synthetic_train", "frn_synthetic_val"} <= set(DatasetCatalog.list())
    assert MetadataCatalog.get("frn_synthetic_val").thing_classes == list(CLASSES)
    try:
        register_synthetic(str(tmp_path / "nowhere"))
        with pytest.raises(FileNotFoundError, match="make_synthetic_coco.py"):
            DatasetCatalog.get("frn_synthetic_train")
    finally:
        register_synthetic()


def _name():
    return f"test_{uuid.uuid4().hex[:8]}"


def test_user_dataset_loads_and_rle_is_detected(polygon_root, rle_root):
    poly, rle = _name(), _name()
    register_coco_dataset(poly, os.path.join(polygon_root, "annotations", "instances_val.json"),
                          os.path.join(polygon_root, "val"))
    register_coco_dataset(rle, os.path.join(rle_root, "annotations", "instances_val.json"), os.path.join(rle_root, "val"))
    assert len(DatasetCatalog.get(poly)) == SPEC.num_val
    assert not uses_rle_masks(poly) and uses_rle_masks(rle)
    with pytest.raises(ValueError, match="already registered"):
        register_coco_dataset(poly, "x.json", "x")


def test_malformed_json_error_names_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text('{"pictures": []}')
    for path in (broken, not_coco):
        name = _name()
        register_coco_dataset(name, str(path), str(tmp_path))
        with pytest.raises(ValueError, match=str(path)):
            DatasetCatalog.get(name)
    name = _name()
    register_coco_dataset(name, str(tmp_path / "absent.json"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="absent.json"):
        DatasetCatalog.get(name)


def test_missing_image_error_names_the_image(polygon_root, tmp_path):
    data = _json(polygon_root, "val")
    data["images"][1]["file_name"] = "gone.png"
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data))
    name = _name()
    register_coco_dataset(name, str(path), os.path.join(polygon_root, "val"))
    with pytest.raises(FileNotFoundError, match=r"(?s)1 of 4 images.*gone\.png"):
        DatasetCatalog.get(name)


def test_unknown_dataset_name_lists_registered_ones():
    with pytest.raises(ValueError, match=r"unknown dataset name\(s\) \['no_such_set'\] in DATASETS.TRAIN.*frn_synthetic_train"):
        check_registered(["frn_synthetic_train", "no_such_set"], "DATASETS.TRAIN")


@pytest.mark.parametrize("change,message", [
    (lambda d: d["annotations"][2].update(category_id=99),
     r"1 annotations in .* name categories that its 'categories' lack \(e.g. annotation 3: category_id 99"),
    (lambda d: d["annotations"][0].update(bbox=[3.0, 4.0, 0.0, 5.0]),
     r"1 annotations in .* have boxes without positive width and height \(e.g. annotation 1: bbox \[3.0, 4.0, 0.0, 5.0\]"),
], ids=["unknown_category", "empty_box"])
def test_bad_annotations_are_named_before_training(polygon_root, tmp_path, change, message):
    data = _json(polygon_root, "val")
    change(data)
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data))
    name = _name()
    register_coco_dataset(name, str(path), os.path.join(polygon_root, "val"))
    with pytest.raises(ValueError, match=f"dataset '{name}': " + message):
        DatasetCatalog.get(name)

"""The synthetic COCO generator, make_synthetic_coco.py and dataset registration with clear errors."""
import json
import logging
import os
import re
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
from frn_det.data.coco_checks import AnnotationError
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


def _second_image_id(d):
    d["images"][1]["id"] = d["images"][0]["id"]


def _drop_image(d):
    d["images"] = [i for i in d["images"] if i["id"] != d["annotations"][0]["image_id"]]


def _rle(d):
    image = next(i for i in d["images"] if i["id"] == d["annotations"][0]["image_id"])
    d["annotations"][0]["segmentation"] = {"size": [image["height"] + 1, image["width"]], "counts": [0, 4]}


# (what is wrong, its change to the synthetic val json, what the error says about it); the decisions
# are docs/training.md's "COCO json checks" table
BAD_ANNOTATIONS = [
    ("unknown_category", lambda d: d["annotations"][2].update(category_id=99),
     r"annotations naming a category the file's 'categories' lack: 1 \(annotation 3 of image \d+: category_id 99"),
    ("empty_box", lambda d: d["annotations"][0].update(bbox=[3.0, 4.0, 0.0, 5.0]),
     r"boxes without positive width and height: 1 \(annotation 1 of image \d+: bbox \[3.0, 4.0, 0.0, 5.0\]"),
    ("nan_x", lambda d: d["annotations"][0]["bbox"].__setitem__(0, float("nan")),
     r"bbox with a value that is not a finite number \(NaN, inf, text\): 1 \(annotation 1 of image \d+: bbox \[nan"),
    ("nan_height", lambda d: d["annotations"][1]["bbox"].__setitem__(3, float("nan")),
     r"bbox with a value that is not a finite number \(NaN, inf, text\): 1 \(annotation 2 "),
    ("inf_area", lambda d: d["annotations"][0].update(area=float("inf")),
     r"area that is not a finite number >= 0 .*: 1 \(annotation 1 of image \d+: area inf"),
    ("three_number_bbox", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
     r"bbox that is not 4 numbers \[x, y, w, h\]: 1 \(annotation 1 of image \d+: bbox \[1, 2, 3\]"),
    ("nan_polygon", lambda d: d["annotations"][0]["segmentation"][0].__setitem__(1, float("nan")),
     r"polygons with a coordinate that is not a finite number: 1 \(annotation 1 "),
    ("short_polygon", lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 5]]),
     r"polygons with fewer than 6 coordinates .*: 1 \(annotation 1 of image \d+: lengths \[4\]"),
    ("rle_size", _rle, r"RLE of another size than its image: 1 \(annotation 1 of image \d+: size \[\d+, \d+\]"),
    ("iscrowd_2", lambda d: d["annotations"][0].update(iscrowd=2), r"iscrowd other than 0 or 1: 1 \(annotation 1 .*iscrowd 2"),
    ("text_in_bbox", lambda d: d["annotations"][0]["bbox"].__setitem__(2, "12"),
     r"bbox with a value that is not a finite number \(NaN, inf, text\): 1 \(annotation 1 "),
    ("inf_width", lambda d: d["annotations"][0]["bbox"].__setitem__(2, float("inf")),
     r"bbox with a value that is not a finite number .*: 1 \(annotation 1 of image \d+: bbox \[.*inf"),
    ("no_bbox", lambda d: d["annotations"][0].pop("bbox"), r"bbox that is not 4 numbers .*: 1 \(annotation 1 .*bbox None"),
    ("negative_area", lambda d: d["annotations"][1].update(area=-4.0),
     r"area that is not a finite number >= 0 .*: 1 \(annotation 2 of image \d+: area -4.0"),
    ("odd_polygon", lambda d: d["annotations"][0]["segmentation"][0].append(3.0),
     r"polygons with fewer than 6 coordinates or an odd number .*: 1 \(annotation 1 of image \d+: lengths \[\d*[13579]\]"),
    ("rle_without_size", lambda d: d["annotations"][0].update(segmentation={"counts": "abc"}),
     r"RLE without a \[height, width\] size: 1 \(annotation 1 "),
    ("segmentation_text", lambda d: d["annotations"][0].update(segmentation="polygon"),
     r"segmentation that is neither polygons nor an RLE: 1 \(annotation 1 "),
    ("iscrowd_text", lambda d: d["annotations"][0].update(iscrowd="0"), r"iscrowd other than 0 or 1: 1 \(annotation 1 .*iscrowd '0'"),
    ("ignore_set", lambda d: d["annotations"][0].update(ignore=1), r"'ignore' set \(.*use iscrowd 1\): 1 \(annotation 1 "),
    ("category_id_text", lambda d: d["annotations"][0].update(category_id="1"),
     r"annotations naming a category the file's 'categories' lack: 1 \(annotation 1 of image \d+: category_id '1'"),
    ("repeated_image_id", _second_image_id, r"repeated image ids \(.*\): 1 \(id \d+ 2 times"),
    ("repeated_annotation_id", lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]),
     r"repeated annotation ids: 1 \(id 1 2 times"),
    ("image_id_without_image", _drop_image, r"annotations whose image_id has no image .*: \d+ \(annotation 1 of image"),
    ("repeated_category_id", lambda d: d["categories"].append(dict(d["categories"][0], name="other")),
     r"repeated category ids: 1 \(id 1 2 times"),
    ("repeated_category_name", lambda d: d["categories"][1].update(name=d["categories"][0]["name"]),
     r"repeated category names .*: 1 \('rectangle' 2 times"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in BAD_ANNOTATIONS], ids=[c[0] for c in BAD_ANNOTATIONS])
def test_bad_annotations_are_named_before_training(polygon_root, tmp_path, change, message):
    data = _json(polygon_root, "val")
    change(data)
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data))  # NaN and inf as JSON's NaN / Infinity, which json.load reads back
    name = _name()
    register_coco_dataset(name, str(path), os.path.join(polygon_root, "val"))
    with pytest.raises(AnnotationError, match=f"(?s)dataset '{name}': {re.escape(str(path))} has annotations .*" + message):
        DatasetCatalog.get(name)


def test_every_problem_is_in_one_error_and_the_rest_counted(polygon_root, tmp_path):
    data = _json(polygon_root, "val")
    for a in data["annotations"][:5]:
        a["iscrowd"] = 3
    data["annotations"][0]["bbox"] = [1, 2, 3]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(data))
    name = _name()
    register_coco_dataset(name, str(path), os.path.join(polygon_root, "val"))
    with pytest.raises(AnnotationError) as e:
        DatasetCatalog.get(name)
    assert re.search(r"iscrowd other than 0 or 1: 5 \(annotation 1 .*; annotation 2 .*; annotation 3 .*; \.\.\.\)", str(e.value))
    assert "bbox that is not 4 numbers [x, y, w, h]: 1 " in str(e.value)


def test_legitimate_oddities_load_with_a_warning(polygon_root, tmp_path, caplog):
    """A box-only annotation (no or empty segmentation) is fine; minival's repeated annotation ids
    and one image listed twice under one file name are warned about, not refused."""
    data = _json(polygon_root, "val")
    data["annotations"][0]["segmentation"] = []
    data["annotations"][1].pop("segmentation")
    data["annotations"][3]["id"] = data["annotations"][2]["id"]
    data["images"].append(dict(data["images"][0], id=10 ** 6))
    path = tmp_path / "instances_minival.json"
    path.write_text(json.dumps(data))
    name = _name()
    register_coco_dataset(name, str(path), os.path.join(polygon_root, "val"))
    with caplog.at_level(logging.WARNING, logger="frn_det.data.coco_checks"):
        dicts = DatasetCatalog.get(name)
    assert len(dicts) == len(data["images"])
    warned = [r.getMessage() for r in caplog.records if r.name == "frn_det.data.coco_checks"]
    assert any("repeated annotation ids: 1 (id 3 2 times)" in w for w in warned), warned
    assert any("images listed more than once under one file_name: 1" in w for w in warned), warned

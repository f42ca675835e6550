"""Pascal VOC folders as datasets (frn_det.data.voc): class names, box conversion, splits, difficult
objects, the cached COCO ground truth and its invalidation, each bad input named with its file, the
shipped BCCD copy, and a VOC folder trained and evaluated through both tools."""
import itertools
import json
import logging
import os
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import load_voc_instances

import frn_det  # noqa: F401  (registers bccd_*)
from frn_det.data import BCCD_CLASSES, ensure_coco_json, register_voc_dataset, voc
from frn_det.data.validation import DataError
from frn_det.engine.coco_eval import load_ground_truth
from train_net_testing import assert_this_checkout
from voc_testing import box, cells_folder, write_voc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_names = itertools.count()


def register(dirname, split, class_names=None):
    name = f"voc_test_{next(_names)}"
    register_voc_dataset(name, str(dirname), split, class_names)
    return name


def coco_json(name):
    ensure_coco_json(name)
    with open(MetadataCatalog.get(name).json_file) as f:
        return json.load(f)


def test_class_names_are_every_splits_names_sorted(tmp_path):
    root = write_voc(tmp_path, {"a": (32, 32, [box("zebra", 1, 1, 8, 8)]), "b": (32, 32, [box("ant", 1, 1, 8, 8)]),
                                "c": (32, 32, [box("moth", 2, 2, 9, 9), box("ant", 3, 3, 9, 9)])},
                     {"train": ["a"], "val": ["b", "c"]})
    train, val = register(root, "train"), register(root, "val")
    assert MetadataCatalog.get(train).thing_classes == MetadataCatalog.get(val).thing_classes == ["ant", "moth", "zebra"]
    assert [a["category_id"] for d in DatasetCatalog.get(val) for a in d["annotations"]] == [0, 1, 0]
    given = register(root, "val", ["zebra", "moth", "ant"])  # given names keep their order
    assert [a["category_id"] for d in DatasetCatalog.get(given) for a in d["annotations"]] == [2, 1, 2]


def test_boxes_convert_from_voc_1_based_inclusive_pixels(tmp_path):
    # VOC (1, 1)-(10, 20) covers pixels 1..10 x 1..20: 10 x 20 pixels from the corner, i.e. the
    # continuous box [0, 0, 10, 20]; COCO: [x, y, w, h] = [0, 0, 10, 20], area 200.
    root = write_voc(tmp_path, {"a": (40, 30, [box("cell", 1, 1, 10, 20), box("cell", "5.5", 7, 40, 30)])},
                     {"train": ["a"]})
    name = register(root, "train")
    (d,) = DatasetCatalog.get(name)
    assert (d["file_name"], d["image_id"], d["width"], d["height"]) == (os.path.join(root, "JPEGImages", "a.jpg"), "a", 40, 30)
    assert [a["bbox"] for a in d["annotations"]] == [[0.0, 0.0, 10.0, 20.0], [4.5, 6.0, 40.0, 30.0]]
    anns = coco_json(name)["annotations"]
    assert [a["bbox"] for a in anns] == [[0.0, 0.0, 10.0, 20.0], [4.5, 6.0, 35.5, 24.0]]
    assert [a["area"] for a in anns] == [200.0, 35.5 * 24.0] and [a["iscrowd"] for a in anns] == [0, 0]


def test_dicts_are_detectron2s_load_voc_instances(tmp_path):
    root = cells_folder(tmp_path)
    for split in ("train", "val"):
        ours = DatasetCatalog.get(register(root, split))
        theirs = load_voc_instances(root, split, ["cat", "dog"])
        for a in ours:
            for ann in a["annotations"]:
                assert ann.pop("iscrowd") == 0  # the one key detectron2's dicts lack
        assert ours == theirs


def test_difficult_objects_are_crowd_regions_coco_evaluation_ignores(tmp_path):
    from pycocotools.cocoeval import COCOeval

    root = write_voc(tmp_path, {"a": (64, 64, [box("cell", 1, 1, 20, 20), box("cell", 30, 30, 60, 60, difficult=1)])},
                     {"test": ["a"]})
    name = register(root, "test")
    assert [a["iscrowd"] for a in DatasetCatalog.get(name)[0]["annotations"]] == [0, 1]
    ensure_coco_json(name)
    gt = load_ground_truth(MetadataCatalog.get(name).json_file)

    def ap(dets):
        ev = COCOeval(gt, gt.loadRes([{"image_id": "a", "category_id": 0, "bbox": b, "score": s} for b, s in dets]), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
        return ev.stats[0]

    # found the plain cell only: nothing missed (the difficult one does not count as a miss) ...
    assert ap([([0, 0, 20, 20], 0.9)]) == pytest.approx(1.0)
    # ... and a detection on the difficult one is no false positive, even when it scores highest
    assert ap([([29, 29, 31, 31], 0.95), ([0, 0, 20, 20], 0.9)]) == pytest.approx(1.0)


def test_single_pixel_boxes_are_kept_as_1_px_with_a_warning(tmp_path, caplog):
    root = write_voc(tmp_path, {"a": (32, 32, [box("cell", 5, 6, 5, 6), box("cell", 1, 1, 8, 8)])}, {"train": ["a"]})
    name = register(root, "train")
    with caplog.at_level(logging.WARNING, logger="frn_det.data.voc"):
        (d,) = DatasetCatalog.get(name)
    assert d["annotations"][0]["bbox"] == [4.0, 5.0, 5.0, 6.0]
    assert "1 single-pixel boxes" in caplog.text and os.path.join(root, "Annotations", "a.xml") in caplog.text


def test_boxes_leaving_the_image_are_clipped_with_a_warning(tmp_path, caplog):
    root = write_voc(tmp_path, {"a": (32, 24, [box("cell", 0, 3, 40, 10)])}, {"train": ["a"]})
    name = register(root, "train")
    with caplog.at_level(logging.WARNING, logger="frn_det.data.voc"):
        (d,) = DatasetCatalog.get(name)
    assert d["annotations"][0]["bbox"] == [0.0, 2.0, 32.0, 10.0]
    assert "boxes that leave their image, clipped" in caplog.text and "a.xml: object 0" in caplog.text


BAD_INPUTS = {
    # case: (images, splits, class names, split registered, what the message must say)
    "empty split": ({"a": (32, 32, [box("c", 1, 1, 8, 8)])}, {"train": []}, None, "train",
                    ["train.txt lists no image ids", "empty split"]),
    "missing split": ({"a": (32, 32, [box("c", 1, 1, 8, 8)])}, {"train": ["a"]}, None, "val",
                      ["val.txt does not exist", "splits there: ['train']"]),
    "repeated id": ({"a": (32, 32, [box("c", 1, 1, 8, 8)])}, {"train": ["a", "a"]}, None, "train",
                    ["lists image ids more than once: ['a']"]),
    "unknown class": ({"a": (32, 32, [box("c", 1, 1, 8, 8), box("dog", 2, 2, 9, 9)])}, {"train": ["a"]}, ["c"], "train",
                      ["class name outside the dataset's classes ['c']", "a.xml: object 1: name 'dog'"]),
    "non-numeric box": ({"a": (32, 32, [box("c", "one", 1, 8, 8)])}, {"train": ["a"]}, None, "train",
                        ["without four finite numbers", "a.xml: object 0"]),
    "NaN box": ({"a": (32, 32, [box("c", 1, "nan", 8, 8)])}, {"train": ["a"]}, None, "train",
                ["without four finite numbers", "a.xml: object 0"]),
    "inverted box": ({"a": (32, 32, [box("c", 9, 1, 8, 8)])}, {"train": ["a"]}, None, "train",
                     ["inverted boxes", "a.xml: object 0: [9.0, 1.0, 8.0, 8.0]"]),
    "box outside the image": ({"a": (32, 32, [box("c", 40, 1, 50, 8)])}, {"train": ["a"]}, None, "train",
                              ["wholly outside their image", "a.xml: object 0"]),
    "zero size": ({"a": (0, 32, [box("c", 1, 1, 8, 8)])}, {"train": ["a"]}, None, "train",
                  ["without a positive integer size/width", "a.xml"]),
    "difficult flag": ({"a": (32, 32, [box("c", 1, 1, 8, 8, difficult="maybe")])}, {"train": ["a"]}, None, "train",
                       ["difficult flag is not 0 or 1", "difficult 'maybe'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_voc_input_is_named_with_its_file(tmp_path, case):
    images, splits, classes, split, says = BAD_INPUTS[case]
    if case == "zero size":  # no image can be 0 px wide: write a valid one and the xml's size as 0
        images = {"a": (32, 32, images["a"][2])}
    root = write_voc(tmp_path, images, splits)
    if case == "zero size":
        path = os.path.join(root, "Annotations", "a.xml")
        with open(path) as f:
            text = f.read().replace("<width>32</width>", "<width>0</width>")
        with open(path, "w") as f:
            f.write(text)
    name = register(root, split, classes or ["c"])
    with pytest.raises(DataError) as e:
        DatasetCatalog.get(name)
    for s in [f"dataset '{name}'"] + says:
        assert s in str(e.value)


def test_missing_and_broken_files_are_named(tmp_path):
    root = write_voc(tmp_path, {k: (32, 32, [box("c", 1, 1, 8, 8)]) for k in "abcd"}, {"train": list("abcd")})
    os.remove(os.path.join(root, "Annotations", "b.xml"))
    with open(os.path.join(root, "Annotations", "c.xml"), "w") as f:
        f.write("<annotation><size>")
    os.remove(os.path.join(root, "JPEGImages", "d.jpg"))
    with pytest.raises(DataError) as e:
        DatasetCatalog.get(register(root, "train", ["c"]))
    msg = str(e.value)
    assert f"1 image ids without an annotation file:\n  {os.path.join(root, 'Annotations', 'b.xml')}" in msg
    assert f"1 annotation files that are not valid XML:\n  {os.path.join(root, 'Annotations', 'c.xml')}: " in msg
    assert f"without their image (JPEGImages/<id>.jpg):\n  {os.path.join(root, 'JPEGImages', 'd.jpg')}" in msg


def test_not_a_voc_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="is not a Pascal VOC folder: it lacks Annotations"):
        register_voc_dataset("voc_test_not_a_folder", str(tmp_path), "train")
    with pytest.raises(DataError, match="does not exist"):
        register_voc_dataset("voc_test_nowhere", str(tmp_path / "nowhere"), "train")


def test_cached_ground_truth_follows_the_loader_and_its_inputs(tmp_path, monkeypatch):
    root = write_voc(tmp_path, {"a": (32, 32, [box("c", 1, 1, 8, 8)])}, {"test": ["a"]})
    first = register(root, "test", ["c"])
    assert len(coco_json(first)["annotations"]) == 1
    xml = os.path.join(root, "Annotations", "a.xml")
    with open(xml) as f:
        text = f.read()
    with open(xml, "w") as f:  # another object: a larger file
        f.write(text.replace("</annotation>", "<object><name>c</name><bndbox><xmin>3</xmin><ymin>3</ymin>"
                             "<xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>"))
    edited = register(root, "test", ["c"])
    assert MetadataCatalog.get(edited).json_file != MetadataCatalog.get(first).json_file
    assert len(coco_json(edited)["annotations"]) == 2
    monkeypatch.setattr(voc, "LOADER_VERSION", voc.LOADER_VERSION + 1)  # a changed loader: new ground truth
    assert MetadataCatalog.get(register(root, "test", ["c"])).json_file != MetadataCatalog.get(edited).json_file


def test_bccd_elsewhere_says_where_it_is_looked_for(tmp_path, monkeypatch):
    from frn_det.data import register_bccd

    monkeypatch.setenv("FRN_DET_BCCD", str(tmp_path / "nowhere"))
    register_bccd()
    try:
        with pytest.raises(DataError, match=r"'bccd_val': Pascal VOC folder .*nowhere does not exist \(BCCD ships in"):
            DatasetCatalog.get("bccd_val")
    finally:
        monkeypatch.delenv("FRN_DET_BCCD")
        register_bccd()
    assert len(DatasetCatalog.get("bccd_val")) == 87


def test_shipped_bccd_copy():
    sizes = {"train": (205, 2805), "val": (87, 1138), "test": (72, 945), "trainval": (292, 3943)}
    for split, (images, boxes) in sizes.items():
        dicts = DatasetCatalog.get(f"bccd_{split}")
        assert (len(dicts), sum(len(d["annotations"]) for d in dicts)) == (images, boxes)
        assert MetadataCatalog.get(f"bccd_{split}").thing_classes == list(BCCD_CLASSES)
    assert voc.voc_class_names(MetadataCatalog.get("bccd_test").dirname) == list(BCCD_CLASSES)
    assert all(os.path.isfile(d["file_name"]) for d in DatasetCatalog.get("bccd_trainval") + DatasetCatalog.get("bccd_test"))
    for name in ("LICENSE", "SOURCE.md"):
        assert os.path.isfile(os.path.join(REPO, "datasets", "BCCD", name))


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["train_net.py", "lazy_train_net.py"])
def test_a_voc_folder_trains_and_evaluates_through_the_tools(tmp_path, tool):
    root = cells_folder(tmp_path / "voc")
    out = tmp_path / "out"
    voc_args = ["--voc-dataset", "cells_train", root, "train", "--voc-dataset", "cells_val", root, "val"]
    if tool == "train_net.py":
        opts = ["DATASETS.TRAIN", "('cells_train',)", "DATASETS.TEST", "('cells_val',)", "MODEL.RETINANET.NUM_CLASSES", "2",
                "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
                "INPUT.MAX_SIZE_TEST", "64", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
                "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)]
        config = os.path.join(REPO, "configs", "bccd", "retinanet_R18_FPN_FRN.yaml")
    else:
        opts = ["dataloader.train.dataset.names=cells_train", "dataloader.test.dataset.names=cells_val",
                "dataloader.evaluator.dataset_name=cells_val", "model.model.num_classes=2", "train.max_iter=3",
                "train.eval_period=0", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
                f"train.output_dir={out}"]
        config = os.path.join(REPO, "configs", "lazy", "retinanet_R18_FPN_FRN_synthetic.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), "--config-file", config, *voc_args, *opts],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_this_checkout(proc.stdout + proc.stderr)
    with open(out / "frn_det_result.json") as f:
        result = json.load(f)
    assert result["test_datasets"] == ["cells_val"] and result["results"]["bbox"]["AP"] is not None
    assert {"AP-cat", "AP-dog"} <= set(result["results"]["bbox"])

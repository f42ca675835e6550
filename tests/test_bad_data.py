"""Bad data named before it costs a run (frn_det.data.validation, the trainer's loaders and
tools/train_net.py): class counts that differ from the model's heads, truncated, unreadable or
missing images, and json widths/heights that differ from the files, on tiny generated COCO datasets;
and valid data untouched (same dicts, same tensors, same random state)."""
import copy
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.utils.env import seed_all_rng
from PIL import Image

import frn_det  # noqa: F401
from frn_det.data import register_coco_dataset
from frn_det.data import validation
from frn_det.data.validation import BadImagesError, ClassCountError, ImageReadError, NameImageErrors
from frn_det.engine import load_cfg
from frn_det.engine.resumable import build_resumable_train_loader
from frn_det.engine.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
RETINANET = os.path.join(REPO, "configs", "synthetic", "retinanet_R18_FPN_GN.yaml")
MASK_RCNN = os.path.join(REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml")


def write_coco(root, name, n=4, size=(64, 48), categories=5, ext="png"):
    """A COCO instances dataset of ``n`` noise images of ``size`` (w, h), one box each, under
    ``root/name/``, json ``root/name.json`` with ``categories`` categories. Returns (json, image root)."""
    img_dir = os.path.join(root, name)
    os.makedirs(img_dir)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        w, h = size
        file_name = f"{i:03d}.{ext}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(img_dir, file_name))
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": i % categories + 1, "bbox": [4.0, 4.0, 20.0, 16.0],
                     "area": 320.0, "iscrowd": 0})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": f"class{k}"} for k in range(categories)]}
    json_file = os.path.join(root, f"{name}.json")
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file, img_dir


def edit_json(json_file, edit):
    with open(json_file) as f:
        data = json.load(f)
    edit(data)
    with open(json_file, "w") as f:
        json.dump(data, f)


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.fixture
def register(request):
    """register(name, json, image_root) under a name unique to the test; returns the name."""
    names = []

    def reg(name, json_file, image_root):
        name = f"{request.node.name}_{name}"
        register_coco_dataset(name, json_file, image_root)
        names.append(name)
        return name

    yield reg
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def make_cfg(train, test=(), config=RETINANET, *opts):
    return load_cfg(config, ["DATASETS.TRAIN", tuple(train), "DATASETS.TEST", tuple(test), "DATALOADER.NUM_WORKERS", 0,
                             *opts])


@pytest.fixture
def data(tmp_path, register):
    """A valid train / val pair (5 categories, as the synthetic configs' heads): (train, val, tmp_path)."""
    train = register("train", *write_coco(str(tmp_path), "train"))
    val = register("val", *write_coco(str(tmp_path), "val", n=2))
    return train, val


# ---------------------------------------------------------------------------------------------
# Class counts


@pytest.mark.parametrize("categories", [6, 4])
def test_class_count_differs_from_retinanet_head(tmp_path, register, categories):
    json_file, root = write_coco(str(tmp_path), "train", categories=categories)
    name = register("train", json_file, root)
    with pytest.raises(ClassCountError) as e:
        validation.check_data(make_cfg([name]), progress=False)
    msg = str(e.value)
    assert (f"MODEL.RETINANET.NUM_CLASSES is 5 (RetinaNet head) but dataset '{name}' ({json_file}) in DATASETS.TRAIN "
            f"has {categories} categories" in msg)
    assert f"set MODEL.RETINANET.NUM_CLASSES {categories}" in msg and "DATASETS.CHECK_NUM_CLASSES False" in msg
    validation.check_data(make_cfg([name], (), RETINANET, "MODEL.RETINANET.NUM_CLASSES", categories), progress=False)
    validation.check_data(make_cfg([name], (), RETINANET, "DATASETS.CHECK_NUM_CLASSES", False), progress=False)


def test_class_count_of_the_test_dataset_and_the_roi_heads(tmp_path, register):
    """A test set with 6 categories against Mask R-CNN's ROI_HEADS.NUM_CLASSES 5: both heads named
    (one key); with a class-agnostic mask head only the box head; ROI_HEADS, not RETINANET, counts."""
    train = register("train", *write_coco(str(tmp_path), "train"))
    val = register("val", *write_coco(str(tmp_path), "val", n=2, categories=6))
    with pytest.raises(ClassCountError, match=rf"MODEL.ROI_HEADS.NUM_CLASSES is 5 \(ROI box head and mask head\) but "
                       rf"dataset '{val}' \(.*val.json\) in DATASETS.TEST has 6 categories") as e:
        validation.check_data(make_cfg([train], [val], MASK_RCNN), progress=False)
    assert f"'{train}'" not in str(e.value)
    with pytest.raises(ClassCountError, match=r"is 5 \(ROI box head\) but"):
        validation.check_data(make_cfg([train], [val], MASK_RCNN, "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", True),
                              progress=False)
    validation.check_data(make_cfg([train], [val], MASK_RCNN, "MODEL.ROI_HEADS.NUM_CLASSES", 6,
                                   "MODEL.RETINANET.NUM_CLASSES", 3), train=False, progress=False)
    assert validation.head_classes(make_cfg([], [], RETINANET, "MODEL.META_ARCHITECTURE", "ProposalNetwork")) == {}


def test_class_count_without_metadata_uses_the_category_ids(request):
    """A dataset registered without thing_classes: its largest category id + 1 is a lower bound."""
    name = f"{request.node.name}_plain"
    ids = [0, 7]
    DatasetCatalog.register(name, lambda: [{"file_name": "x.png", "annotations": [{"category_id": i}]} for i in ids])
    try:
        with pytest.raises(ClassCountError, match=rf"NUM_CLASSES is 5 .* dataset '{name}' in DATASETS.TRAIN has at least "
                           r"8 categories \(no thing_classes in its metadata; its largest category_id is 7\): set "
                           r"MODEL.RETINANET.NUM_CLASSES 8 or more"):
            validation.check_data(make_cfg([name]), images=False)
        ids[1] = 3  # classes 0..3 of 5: fine (some classes may have no annotations)
        validation.check_data(make_cfg([name]), images=False)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ---------------------------------------------------------------------------------------------
# Image files, up front


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image_found_by_decode_not_by_headers(tmp_path, register, ext):
    json_file, root = write_coco(str(tmp_path), "train", ext=ext)
    truncate(os.path.join(root, f"001.{ext}"))
    name = register("train", json_file, root)
    validation.check_data(make_cfg([name], (), RETINANET, "DATASETS.CHECK_IMAGES", "headers"), progress=False)
    with pytest.raises(BadImagesError) as e:
        validation.check_data(make_cfg([name], (), RETINANET, "DATASETS.CHECK_IMAGES", "decode"), progress=False)
    msg = str(e.value)
    assert f"dataset '{name}' ({json_file}): 1 of 4 images fail the 'decode' check" in msg
    assert f"{os.path.join(root, f'001.{ext}')}: OSError: image file is truncated" in msg
    assert "DATASETS.CHECK_IMAGES decode" in msg


def test_wrong_size_in_the_json_found_by_headers(tmp_path, register):
    json_file, root = write_coco(str(tmp_path), "train")
    edit_json(json_file, lambda d: d["images"][2].update(width=50))
    name = register("train", json_file, root)
    cfg = make_cfg([name])
    assert cfg.DATASETS.CHECK_IMAGES == "headers"  # the default
    with pytest.raises(BadImagesError, match=rf"dataset '{name}' \(.*train.json\): 1 of 4 images fail the 'headers' "
                       rf"check:\n    .*002.png: the json says width 50 x height 48, the file is 64 x 48"):
        validation.check_data(cfg, progress=False)
    validation.check_data(make_cfg([name], (), RETINANET, "DATASETS.CHECK_IMAGES", "none"), progress=False)


def test_exif_orientation_is_taken_as_detectron2_reads_the_image(tmp_path):
    """A JPEG stored 64x48 with EXIF orientation 6 (rotate 90) reads as 48x64 in detectron2: the json
    must say 48x64, and the check agrees with detectron2's own size check both ways."""
    path = str(tmp_path / "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(path, exif=exif)
    upright = {"file_name": path, "width": 48, "height": 64, "image_id": 1}
    raw = dict(upright, width=64, height=48)
    assert validation.find_bad_images([upright], progress=False) == []
    assert validation.find_bad_images([raw], progress=False) == [
        (path, "the json says width 64 x height 48, the file is 48 x 64 after its EXIF orientation")]
    cfg = make_cfg([])
    DatasetMapper(cfg, False)(upright)
    with pytest.raises(SizeMismatchError):
        DatasetMapper(cfg, False)(raw)


def test_unreadable_and_missing_files_all_in_one_error(tmp_path):
    """14 images, 12 bad: the first 10 listed in dataset order, the rest counted; the same with
    two checking processes."""
    dicts = []
    for i in range(14):
        path = str(tmp_path / f"{i:02d}.png")
        if i % 7 == 0:
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
        elif i % 2:
            with open(path, "w") as f:
                f.write("not an image")
        dicts.append({"file_name": path, "width": 8, "height": 8})
    bad = validation.find_bad_images(dicts, "headers", num_workers=0, progress=False)
    assert [f for f, _ in bad] == [d["file_name"] for i, d in enumerate(dicts) if i % 7]
    assert "UnidentifiedImageError: cannot identify image file" in bad[0][1]
    assert "FileNotFoundError" in bad[1][1]
    assert validation.find_bad_images(dicts, "headers", num_workers=2, progress=False) == bad
    with pytest.raises(BadImagesError) as e:
        validation.check_images(dicts, "mine", progress=False)
    msg = str(e.value)
    assert "dataset 'mine': 12 of 14 images fail the 'headers' check" in msg
    assert dicts[11]["file_name"] in msg and dicts[12]["file_name"] not in msg and "... and 2 more" in msg


def test_bad_files_of_train_and_test_datasets_in_one_error(tmp_path, register):
    """Two training datasets merged into one training set: each bad file is put under its own dataset
    (by image root), and the test set's too."""
    a_json, a_root = write_coco(str(tmp_path), "a")
    b_json, b_root = write_coco(str(tmp_path), "b")
    v_json, v_root = write_coco(str(tmp_path), "v", n=2)
    for root in (b_root, v_root):
        truncate(os.path.join(root, "001.png"))
    a, b, v = register("a", a_json, a_root), register("b", b_json, b_root), register("v", v_json, v_root)
    cfg = make_cfg([a, b], [v], RETINANET, "DATASETS.CHECK_IMAGES", "decode")
    merged = DatasetCatalog.get(a) + DatasetCatalog.get(b)
    with pytest.raises(BadImagesError) as e:
        validation.check_data(cfg, train_dicts=merged, progress=False)
    msg = str(e.value)
    assert f"dataset '{b}' ({b_json}): 1 of 4 images fail" in msg and f"dataset '{v}' ({v_json}): 1 of 2" in msg
    assert f"dataset '{a}'" not in msg
    assert validation.split_by_dataset(merged, [a, b]) == [(a, merged[:4]), (b, merged[4:])]


# ---------------------------------------------------------------------------------------------
# Image files, during training


def test_truncated_image_named_from_a_data_loader_worker(tmp_path, register):
    """Under "headers" a truncated file passes the check; the training loader's worker then names it
    and its dataset (not a bare `OSError: image file is truncated`)."""
    json_file, root = write_coco(str(tmp_path), "train")
    truncate(os.path.join(root, "002.png"))
    name = register("train", json_file, root)
    loader = Trainer.build_train_loader(make_cfg([name], (), RETINANET, "DATALOADER.NUM_WORKERS", 1))
    with pytest.raises(ImageReadError) as e:
        for _, _ in zip(range(4), loader):
            pass
    msg = str(e.value)
    assert "Caught ImageReadError in DataLoader worker process 0" in msg
    assert (f"dataset '{name}' ({json_file}): cannot read image {os.path.join(root, '002.png')}: OSError: image file "
            "is truncated" in msg)


def test_wrong_size_named_during_evaluation_without_the_check(tmp_path, register):
    json_file, root = write_coco(str(tmp_path), "val", n=2)
    edit_json(json_file, lambda d: d["images"][1].update(height=40))
    name = register("val", json_file, root)
    loader = Trainer.build_test_loader(make_cfg([], [name], RETINANET, "DATASETS.CHECK_IMAGES", "none"), name)
    with pytest.raises(ImageReadError, match=rf"(?s)dataset '{name}' \(.*val.json\): cannot read image .*001.png: "
                       r"SizeMismatchError: Mismatched image shape .*DATASETS.CHECK_IMAGES headers"):
        list(loader)


# ---------------------------------------------------------------------------------------------
# Valid data: nothing changes


def test_valid_data_passes_and_is_left_as_it_was(data):
    """The checks pass, draw no random numbers and leave the dicts as they were; the wrapped mapper
    and the trainer's loader give bitwise the tensors of detectron2's."""
    train, val = data
    cfg = make_cfg([train], [val], RETINANET, "DATASETS.CHECK_IMAGES", "decode")
    dicts = DatasetCatalog.get(train)
    before = copy.deepcopy(dicts)
    seed_all_rng(3)
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    report = validation.check_data(cfg, train_dicts=dicts, num_workers=2, progress=False)
    assert set(report) == {train, val} and report[train]["images"] == 4
    after = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    assert torch.equal(states[0], after[0]) and states[2] == after[2]
    assert all(np.array_equal(x, y) for x, y in zip(states[1], after[1]))
    assert dicts == before and DatasetCatalog.get(train) == before

    for is_train in (True, False):
        mapper = DatasetMapper(cfg, is_train)
        for d in dicts:
            seed_all_rng(1)
            plain = mapper(d)
            seed_all_rng(1)
            wrapped = NameImageErrors(mapper, [train])(d)
            assert torch.equal(plain["image"], wrapped["image"])
            if is_train:
                assert torch.equal(plain["instances"].gt_boxes.tensor, wrapped["instances"].gt_boxes.tensor)
                assert torch.equal(plain["instances"].gt_classes, wrapped["instances"].gt_classes)
    assert dicts == before

    ours, resumable = Trainer.build_train_loader(cfg), build_resumable_train_loader(cfg)
    for batch, stock_batch in zip(zip(range(3), ours), zip(range(3), resumable)):
        for x, y in zip(batch[1], stock_batch[1]):
            assert x["file_name"] == y["file_name"] and torch.equal(x["image"], y["image"])
            assert torch.equal(x["instances"].gt_boxes.tensor, y["instances"].gt_boxes.tensor)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_trainers_stream_is_detectron2s_training_sampler(data, workers):
    """The trainer's (resumable) loader yields the batches of detectron2's build_detection_train_loader
    with detectron2's TrainingSampler seeded with SEED, in the same order (12 batches: 6 epochs of the
    4 training images); with the random flip off and one size, the same tensors. (detectron2's own
    config path draws the sampler's seed from numpy's generator instead: another shuffle.)"""
    from detectron2.data.build import _train_loader_from_config
    from detectron2.data.samplers import TrainingSampler

    train, val = data
    cfg = make_cfg([train], [val], RETINANET, "SEED", 7, "DATALOADER.NUM_WORKERS", workers,
                   "INPUT.RANDOM_FLIP", "none", "INPUT.MIN_SIZE_TRAIN", (48,))
    args = _train_loader_from_config(cfg)
    stock = build_detection_train_loader(**dict(args, sampler=TrainingSampler(len(args["dataset"]), seed=cfg.SEED)))
    ours = Trainer.build_train_loader(cfg)
    names = []
    for (_, x), (_, y) in zip(zip(range(12), ours), zip(range(12), stock)):
        assert [d["file_name"] for d in x] == [d["file_name"] for d in y]
        for a, b in zip(x, y):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["instances"].gt_boxes.tensor,
                                                                       b["instances"].gt_boxes.tensor)
        names += [d["file_name"] for d in x]
    assert sorted(names[:4]) == sorted(set(names)) and names[:4] != names[4:8]  # every image once per epoch, reshuffled


def test_check_images_setting_is_validated(data):
    with pytest.raises(ValueError, match=r"DATASETS.CHECK_IMAGES must be one of \('none', 'headers', 'decode'\), got 'all'"):
        validation.check_data(make_cfg([data[0]], (), RETINANET, "DATASETS.CHECK_IMAGES", "all"))


# ---------------------------------------------------------------------------------------------
# tools/train_net.py --dataset: stops before the first iteration, naming the file or key


def train_net(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TRAIN_NET, *args], capture_output=True, text=True, env=env, cwd=REPO)


def _run_opts(out, train="mine_train"):
    return ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", "()", "INPUT.MIN_SIZE_TRAIN", "(48,)",
            "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1",
            "DATALOADER.NUM_WORKERS", "1", "OUTPUT_DIR", str(out)]


@pytest.mark.slow
def test_train_net_stops_before_training_on_a_class_count_mismatch(tmp_path):
    json_file, root = write_coco(str(tmp_path), "train", categories=6)
    proc = train_net("--config-file", RETINANET, "--dataset", "mine_train", json_file, root, *_run_opts(tmp_path / "out"))
    assert proc.returncode != 0
    assert "ClassCountError" in proc.stderr
    assert (f"MODEL.RETINANET.NUM_CLASSES is 5 (RetinaNet head) but dataset 'mine_train' ({json_file}) in "
            "DATASETS.TRAIN has 6 categories" in proc.stderr)
    assert "Starting training from iteration" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_net_stops_before_training_on_a_truncated_image_with_decode(tmp_path):
    json_file, root = write_coco(str(tmp_path), "train", ext="jpg")
    truncate(os.path.join(root, "003.jpg"))
    proc = train_net("--config-file", RETINANET, "--dataset", "mine_train", json_file, root, *_run_opts(tmp_path / "out"),
                     "DATASETS.CHECK_IMAGES", "decode")
    assert proc.returncode != 0
    assert "BadImagesError" in proc.stderr
    assert f"{os.path.join(root, '003.jpg')}: OSError: image file is truncated" in proc.stderr
    assert "Starting training from iteration" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_net_names_a_truncated_image_met_during_training(tmp_path):
    """The default ("headers") passes a truncated file; training then fails naming it and its dataset."""
    json_file, root = write_coco(str(tmp_path), "train")
    truncate(os.path.join(root, "000.png"))
    proc = train_net("--config-file", RETINANET, "--dataset", "mine_train", json_file, root, *_run_opts(tmp_path / "out"))
    assert proc.returncode != 0
    assert (f"ImageReadError: dataset 'mine_train' ({json_file}): cannot read image {os.path.join(root, '000.png')}: "
            "OSError: image file is truncated" in proc.stderr)


@pytest.mark.slow
def test_train_net_check_data_only(tmp_path):
    json_file, root = write_coco(str(tmp_path), "train")
    edit_json(json_file, lambda d: d["images"][0].update(width=63))
    proc = train_net("--config-file", RETINANET, "--dataset", "mine_train", json_file, root, "--check-data-only",
                     *_run_opts(tmp_path / "out"))
    assert proc.returncode != 0
    assert (f"'decode' check:\n    {os.path.join(root, '000.png')}: the json says width 63 x height 48, the file is "
            "64 x 48" in proc.stderr)
    edit_json(json_file, lambda d: d["images"][0].update(width=64))
    proc = train_net("--config-file", RETINANET, "--dataset", "mine_train", json_file, root, "--check-data-only",
                     *_run_opts(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Data check passed (classes; images: decode: 4 images of 'mine_train' in" in proc.stdout
    assert not os.path.exists(tmp_path / "out" / "model_final.pth")

"""frn_det.engine.demo: the table and the detections picture `make demo` writes (the pictured model
is a freshly built one saved as the run's final weights), and the norms trained at the same time
(a few iterations at 64 px on a tiny dataset)."""
import json
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from PIL import Image
from train_net_testing import assert_this_checkout, dataset_args, tiny_dataset

import frn_det.data  # noqa: F401  (registers the synthetic datasets)
from frn_det.data import register_synthetic
from frn_det.data.synthetic import SyntheticSpec, generate
from frn_det.engine.config import load_cfg
from frn_det.engine.demo import LABEL_WIDTH, TASKS, config_file, draw_detections, iterations_done, table, train_norms

TRAIN_NET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "train_net.py")


def test_detections_picture_names_the_norm(tmp_path):
    """On frn_synthetic_val registered at a root holding only its first 2 images (a moment to generate)."""
    root = str(tmp_path / "frn_synthetic")
    generate(SyntheticSpec(num_train=1, num_val=2), root, progress=False)
    register_synthetic(root)
    try:
        torch.manual_seed(0)
        model = build_model(load_cfg(config_file("FRN")))
        os.makedirs(tmp_path / "FRN")
        DetectionCheckpointer(model, save_dir=str(tmp_path / "FRN")).save("model_final")
        path = draw_detections("FRN", str(tmp_path), num_images=2, min_score=1.1)  # no box drawn
    finally:
        register_synthetic()
    picture = np.asarray(Image.open(path).convert("L"))
    assert path == str(tmp_path / "detections_FRN.png")
    assert picture.shape == (2 * 192, LABEL_WIDTH + 2 * 2 * 192)  # label strip + 2 images at the Visualizer's scale 2
    strip = picture[:, :LABEL_WIDTH]
    assert np.array_equal(strip, label_strip("FRN", picture.shape[0])) and not np.array_equal(strip, label_strip("GN", picture.shape[0]))


def test_bccd_detections_picture_shows_real_test_images(tmp_path):
    """--dataset bccd: bccd_test's 640x480 images, run at the test size, drawn at 384 px wide."""
    torch.manual_seed(0)
    model = build_model(load_cfg(config_file("GN", TASKS["bccd"]), TASKS["bccd"].opts))
    os.makedirs(tmp_path / "GN")
    DetectionCheckpointer(model, save_dir=str(tmp_path / "GN")).save("model_final")
    path = draw_detections("GN", str(tmp_path), num_images=2, min_score=1.1, task=TASKS["bccd"])
    picture = np.asarray(Image.open(path).convert("L"))
    assert picture.shape == (288, LABEL_WIDTH + 2 * 384)
    first = np.asarray(Image.open(DatasetCatalog.get("bccd_test")[0]["file_name"]).convert("L").resize((384, 288)))
    assert np.abs(picture[:, LABEL_WIDTH:LABEL_WIDTH + 384].astype(float) - first).mean() < 8  # the image itself


def label_strip(text, height):
    """The strip a picture of ``text``'s detections should start with: the name, centred, black on white."""
    from PIL import ImageDraw, ImageFont

    strip = Image.new("RGB", (LABEL_WIDTH, height), "white")
    ImageDraw.Draw(strip).text((LABEL_WIDTH // 2, height // 2), text, fill="black", anchor="mm",
                               font=ImageFont.load_default(size=32))
    return np.asarray(strip.convert("L"))


def test_table_rows_per_norm():
    bbox = {"AP": 21.46, "AP50": 33.8, "AP75": 25.4, "APs": 28.8, "APm": float("nan")}
    md = table({"FRN": {"results": {"bbox": bbox}, "max_iter": 1900, "wall_time_s": 263.6}})
    assert md.splitlines()[2] == "| FRN |  21.5 |  33.8 |  25.4 |  28.8 |   n/a | 1900 | 264 |"


# The demo's configs on a tiny synthetic dataset (its evaluation a moment, not the 500 images of
# frn_synthetic_val), at 64 px, for 3 iterations.
TINY_RUN = ["DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
            "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(2,)", "DATALOADER.NUM_WORKERS", "0",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "64"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """tools/train_net.py arguments registering tiny_{train,val} (6 and 3 images)."""
    root = tmp_path_factory.mktemp("tiny")
    return dataset_args(tiny_dataset(root, num_train=6, num_val=3, seed=3))


@pytest.mark.slow
def test_norms_train_at_the_same_time_each_to_its_result(tmp_path, tiny_data):
    os.makedirs(tmp_path / "BN")  # a stale run: without --resume it is cleared, not appended to
    (tmp_path / "BN" / "metrics.json").write_text(json.dumps({"iteration": 999, "bbox/AP": 99.0}) + "\n")
    results = train_norms(["BN", "FRN"], str(tmp_path), resume=False, opts=TINY_RUN, train_net=TRAIN_NET, poll_s=0.2,
                          train_args=tiny_data)
    assert {n: (r["norm"], r["max_iter"], r["ims_per_batch"]) for n, r in results.items()} == {
        "BN": ("BN", 3, 2), "FRN": ("FRN", 3, 2)}
    assert all(r["test_datasets"] == ["tiny_val"] for r in results.values())  # train_args reached train_net
    assert all(3 <= iterations_done(str(tmp_path / n)) < 10 for n in results)
    for n in results:
        with open(tmp_path / n / "log.txt") as f:
            assert_this_checkout(f.read())
    assert [p["iteration"] for p in results["BN"]["curve"]] == [3] and results["BN"]["curve"][0]["bbox"] != 99.0


@pytest.mark.slow
def test_runs_that_fail_are_one_error_naming_each_log(tmp_path, tiny_data):
    """100 FPN channels do not split into GN's 32 groups: GN fails, BN trains on to the end."""
    with pytest.raises(RuntimeError, match=r"1 of 2 runs failed \(GN\):\nGN \(exit 1\): .*GN.compare_ap_train.log") as e:
        train_norms(["BN", "GN"], str(tmp_path), resume=False, opts=[*TINY_RUN, "MODEL.FPN.OUT_CHANNELS", "100"],
                    train_net=TRAIN_NET, poll_s=0.2, train_args=tiny_data)
    assert "divisible" in str(e.value)  # the end of GN's log says what went wrong
    assert iterations_done(str(tmp_path / "BN")) >= 3

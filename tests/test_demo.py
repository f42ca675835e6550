"""frn_det.engine.demo: the table and the detections picture `make demo` writes (no training: the
pictured model is a freshly built one saved as the run's final weights)."""
import os

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from PIL import Image

import frn_det.data  # noqa: F401  (registers the synthetic datasets)
from frn_det.data import ensure_synthetic
from frn_det.engine.config import load_cfg
from frn_det.engine.demo import CONFIG, LABEL_WIDTH, draw_detections, table


def test_detections_picture_names_the_norm(tmp_path):
    ensure_synthetic(["frn_synthetic_val"])
    torch.manual_seed(0)
    model = build_model(load_cfg(CONFIG.format("FRN")))
    os.makedirs(tmp_path / "FRN")
    DetectionCheckpointer(model, save_dir=str(tmp_path / "FRN")).save("model_final")
    path = draw_detections("FRN", str(tmp_path), num_images=2, min_score=1.1)  # no box drawn
    picture = np.asarray(Image.open(path).convert("L"))
    assert path == str(tmp_path / "detections_FRN.png")
    assert picture.shape == (2 * 192, LABEL_WIDTH + 2 * 2 * 192)  # label strip + 2 images at the Visualizer's scale 2
    strip = picture[:, :LABEL_WIDTH]
    assert strip.min() < 100 and (strip > 250).mean() > 0.9  # dark text on a white strip


def test_table_rows_per_norm():
    bbox = {"AP": 21.46, "AP50": 33.8, "AP75": 25.4, "APs": 28.8, "APm": float("nan")}
    md = table({"FRN": {"results": {"bbox": bbox}, "max_iter": 1900, "wall_time_s": 263.6}})
    assert md.splitlines()[2] == "| FRN |  21.5 |  33.8 |  25.4 |  28.8 |   n/a | 1900 | 264 |"

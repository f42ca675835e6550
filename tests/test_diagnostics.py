"""experiments/cpu_grid/diagnostics.py: norm-layer input statistics against a float64 formula, the
"detected as" rule, the generator's background, and the tool end to end on a tiny model."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances
from torch import nn

from experiments.cpu_grid import diagnostics
from frn_det.data.synthetic import CLASSES, SyntheticSpec, render_image, render_scene, spec_of
from frn_det.layers import FilterResponseNorm2d
from train_net_testing import tiny_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_norm_input_stats_match_the_float64_formula():
    torch.manual_seed(0)
    frn, gn = FilterResponseNorm2d(4), nn.GroupNorm(2, 4)
    with torch.no_grad():
        frn.weight.normal_()
        frn.bias.normal_()
        frn.tau.fill_(0.2)
    model = nn.Sequential(frn, gn)
    stats = diagnostics.NormInputStats(model)
    x = torch.randn(2, 4, 3, 5) + torch.tensor([0.0, 2.0, -1.0, 0.5]).view(1, 4, 1, 1)
    model(x)  # not active: nothing gathered
    assert stats.layers == {}
    stats.active = True
    model(x)
    stats.remove()
    rows = stats.rows("m")
    assert [(r["layer"], r["kind"], r["plane"], r["planes"]) for r in rows] == [("0", "FRN", "3x5", 8), ("1", "GN", "3x5", 8)]
    for r, inp, eps in ((rows[0], x, frn.eps), (rows[1], frn(x), gn.eps)):
        a = inp.detach().double().numpy()
        nu2, mu2 = (a**2).mean(axis=(2, 3)), a.mean(axis=(2, 3)) ** 2
        assert r["median_nu2_over_eps"] == pytest.approx(np.median(nu2 / eps), rel=1e-12)
        assert r["share_nu2_below_eps"] == pytest.approx(np.mean(nu2 < eps))
        assert r["mean_share"] == pytest.approx(np.mean(mu2 / nu2), rel=1e-12)
    at_tau = (frn(x) == 0.2).float().mean().item()
    assert 0 < at_tau < 1 and rows[0]["share_at_tau"] == pytest.approx(at_tau)
    assert np.isnan(rows[1]["share_at_tau"])  # GroupNorm has no tau


@pytest.mark.parametrize("name,stage", [("backbone.bottom_up.stem.conv1.norm", "stem"),
                                        ("backbone.bottom_up.res4.1.conv2.norm", "res4"),
                                        ("backbone.fpn_output3.norm", "fpn"), ("head.cls_subnet.1", "head"),
                                        ("roi_heads.box_head.fc1", "head"), ("pixel_mean", "other")])
def test_stage_of_detectron2_module_names(name, stage):
    assert diagnostics.stage_of(name) == stage


def _instances(boxes_xyxy, scores, classes):
    inst = Instances((64, 64))
    inst.pred_boxes = Boxes(torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def test_detected_as_takes_the_best_scoring_overlapping_detection():
    gt = [[10, 10, 20, 20], [40, 40, 10, 10], [0, 50, 8, 8]]  # xywh
    inst = _instances([[10, 10, 30, 30], [11, 11, 30, 30], [40, 40, 50, 50], [40, 40, 50, 50], [0, 50, 8, 58]],
                      [0.5, 0.9, 0.8, 0.2, 0.9], [0, 2, 1, 4, 3])
    assert diagnostics.detected_as(inst, gt) == [CLASSES[2], CLASSES[1], CLASSES[3]]
    # score threshold: the 0.2 detection never counts, and without the others the object is missed
    assert diagnostics.detected_as(_instances([[40, 40, 50, 50]], [0.2], [4]), gt[1:2]) == [diagnostics.MISSED]
    assert diagnostics.detected_as(_instances([], [], []), gt) == [diagnostics.MISSED] * 3


@pytest.mark.parametrize("spec", [SyntheticSpec(num_train=3, num_val=2), SyntheticSpec(num_train=3, num_val=2, clutter=5,
                                                                                           texture=20.0)])
def test_scene_background_is_the_image_without_its_objects(spec):
    for index in range(3):
        image, background, objects = render_scene(spec, "train", index)
        plain_image, plain_objects = render_image(spec, "train", index)
        assert np.array_equal(image, plain_image) and len(objects) == len(plain_objects)
        painted = np.zeros(image.shape[:2], bool)
        for _, _, full in objects:
            painted |= full
        assert np.array_equal(image[~painted], background[~painted])
        assert (image[painted] != background[painted]).any()


def test_spec_of_reads_the_generator_settings_back(tmp_path):
    root = tiny_dataset(tmp_path / "d", num_val=2, clutter=3)
    spec, split = spec_of(os.path.join(root, "annotations", "instances_val.json"))
    assert split == "val" and spec.clutter == 3 and spec.image_size == 64 and spec.num_val == 2
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"info": {}, "images": [], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="other.json was not written by this synthetic generator"):
        spec_of(str(other))


def _run_dir(tmp_path):
    """A run folder as tools/train_net.py leaves it (config.yaml, model_final.pth) of an untrained tiny
    FRN RetinaNet: the diagnostics need a model, not a good one."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from frn_det.engine import load_cfg

    cfg = load_cfg(os.path.join(REPO, "configs", "synthetic", "retinanet_R18_FPN_FRN.yaml"),
                   ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
                    "OUTPUT_DIR", str(tmp_path)])
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    (tmp_path / "config.yaml").write_text(cfg.dump())
    return str(tmp_path), sum(isinstance(m, FilterResponseNorm2d) for m in model.modules())


def test_tool_end_to_end_on_a_tiny_model(tmp_path):
    root = tiny_dataset(tmp_path / "data", num_val=3)
    val_json = os.path.join(root, "annotations", "instances_val.json")
    (tmp_path / "run").mkdir()
    run_dir, num_frn = _run_dir(tmp_path / "run")
    out = str(tmp_path / "out" / "diag")
    diagnostics.main([run_dir, "--labels", "FRN", "--num-images", "2", "--val-json", val_json, "--out", out])
    with open(f"{out}_layers.csv") as f:
        layers = list(csv.DictReader(f))
    assert len(layers) == num_frn and {r["kind"] for r in layers} == {"FRN"}
    assert all(0 <= float(r["mean_share"]) <= 1 for r in layers)
    at_tau = [float(r["share_at_tau"]) for r in layers]  # NaN: an FRN without TLU (placed before a residual sum)
    assert any(0 <= v <= 1 for v in at_tau) and all(0 <= v <= 1 or np.isnan(v) for v in at_tau)
    with open(val_json) as f:
        anns = json.load(f)["annotations"]
    with open(f"{out}_objects.csv") as f:
        objects = list(csv.DictReader(f))
    assert len(objects) == sum(a["image_id"] <= 2 for a in anns)  # every annotated object of the first 2 images
    assert {o["category"] for o in objects} <= set(CLASSES)
    report = open(f"{out}.md").read()
    assert "| FRN | res2 |" in report and "## Objects in their image and alone" in report
    assert os.path.getsize(f"{out}.png") > 0


def test_missing_run_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml does not exist"):
        diagnostics.load_predictor(str(tmp_path))


def test_a_test_set_that_is_not_synthetic_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    run_dir, _ = _run_dir(tmp_path / "run")
    cfg = diagnostics.load_predictor(run_dir).cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = ("coco_2017_val",)
    with pytest.raises(ValueError, match="'coco_2017_val' is not one of the registered synthetic sets.*--val-json"):
        diagnostics.test_set_annotations(cfg)

"""configs/Base-*.yaml equal detectron2's model zoo bases; every configs/synthetic leaf builds."""
import glob
import os

import pytest
import torch
from detectron2 import model_zoo
from detectron2.modeling import build_model

from frn_det import FilterResponseNorm2d
from frn_det.engine import load_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM_TYPES = {"BN": torch.nn.BatchNorm2d, "GN": torch.nn.GroupNorm, "FRN": FilterResponseNorm2d}


def _cfg(path):
    return load_cfg(path, freeze=False)


@pytest.mark.parametrize("name", ["Base-RetinaNet.yaml", "Base-RCNN-FPN.yaml"])
def test_base_copies_equal_the_model_zoo(name):
    assert _cfg(os.path.join(REPO, "configs", name)) == _cfg(model_zoo.get_config_file(name))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "synthetic", "*_R18_FPN_*.yaml"))),
                         ids=os.path.basename)
def test_synthetic_leaf_builds_with_its_norm(path):
    cfg = _cfg(path)
    norm = cfg.MODEL.RESNETS.NORM
    assert norm == cfg.MODEL.FPN.NORM and path.endswith(f"_{norm}.yaml")
    assert (cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS, cfg.SOLVER.IMS_PER_BATCH) == ("cpu", "", 2)
    assert cfg.TEST.EVAL_PERIOD == 0  # make demo evaluates once, at the end
    assert cfg.INPUT.MIN_SIZE_TEST == 192 and cfg.TEST.DETECTIONS_PER_IMAGE == 100
    assert cfg.DATASETS.TRAIN == ("frn_synthetic_train",) and cfg.DATASETS.TEST == ("frn_synthetic_val",)
    model = build_model(cfg)
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES[norm])]
    others = [m for m in model.modules() if isinstance(m, tuple(t for n, t in NORM_TYPES.items() if n != norm))]
    assert norms and not others
    head = model.head if cfg.MODEL.META_ARCHITECTURE == "RetinaNet" else model.roi_heads.mask_head
    assert any(isinstance(m, NORM_TYPES[norm]) for m in head.modules())

"""configs/coco/: every config loads; norms sit in every place; images per GPU and the schedule
follow the linear rule relative to the family base; the files equal the generator's output
(experiments/coco/configs.py and experiments/cpu_grid/, written by `python -m experiments.gen_configs`).
"""

import glob
import math
import os
import re
from fractions import Fraction

import pytest
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO = os.path.join(REPO, "configs", "coco")
from detectron2.engine import DefaultTrainer
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d
from detectron2.modeling import build_model

from experiments import gen_configs
from experiments.cpu_grid.configs import large_batch_fractions
from experiments.generated import diff
from frn_det.engine import load_cfg
from frn_det.layers import FilterResponseNorm2d

LEAF_RE = re.compile(r"^(?P<norm>BN|SyncBN|GN|FRN|BN-finetuned)_(?P<ipg>\d+)img\.yaml$")
# The file each family's schedule is defined in (R101 shares the RetinaNet family's base).
FAMILY_BASE = {
    "retinanet_R_50_FPN": "retinanet_R_50_FPN/Base.yaml",
    "retinanet_R_101_FPN": "retinanet_R_50_FPN/Base.yaml",
    "mask_rcnn_R_50_FPN": "mask_rcnn_R_50_FPN/Base.yaml",
}
DEPTH = {"retinanet_R_50_FPN": 50, "retinanet_R_101_FPN": 101, "mask_rcnn_R_50_FPN": 50}
NORM_KEYS = {
    "RetinaNet": ("RESNETS", "FPN", "RETINANET"),
    "GeneralizedRCNN": ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"),
}
NORM_CLASS = {"BN": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm, "GN": nn.GroupNorm,
              "FRN": FilterResponseNorm2d, "FrozenBN": FrozenBatchNorm2d}
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FilterResponseNorm2d, FrozenBatchNorm2d)


def leaves():
    out = []
    for path in sorted(glob.glob(os.path.join(COCO, "*", "*.yaml"))):
        if not os.path.basename(path).startswith("Base"):
            out.append(os.path.relpath(path, COCO).replace(os.sep, "/"))
    return out


def load(rel):
    return load_cfg(os.path.join(COCO, rel), freeze=False)


def parse(rel):
    fam, name = rel.split("/")
    m = LEAF_RE.match(name)
    assert m, f"unexpected leaf name {rel}"
    return fam, m["norm"], int(m["ipg"])


LEAVES = leaves()


def test_grid_is_complete():
    got = {parse(rel) for rel in LEAVES}
    want = {(f, n, i) for f in DEPTH for n in ("BN", "SyncBN", "GN", "FRN") for i in (1, 2, 4, 8, 16)}
    want |= {(f, "BN-finetuned", 8) for f in DEPTH}
    assert got == want


def test_committed_configs_equal_generator_output():
    for out_dir, render in gen_configs.TARGETS:
        assert diff(out_dir, render) == [], "run `python -m experiments.gen_configs` and commit the result"


CPU_GRID_LEAF = re.compile(r"(?P<norm>BN|GN|FRN)_(?P<batch>\d+)img(_(?P<variant>[\w.-]+))?\.yaml$")


@pytest.mark.parametrize("grid", ["cpu_grid", "cpu_grid_short"])
def test_cpu_grid_same_images_seen_and_linear_rule(grid):
    """configs/cpu_grid*: every run sees the same images, with warm-up, decays and evaluations at the same
    image counts; each norm's grid runs share one lr per image (the sweep's best), the sweep spans 4x;
    the batch-8 sweep runs the grid's schedule at fractions of the linear-rule rate."""
    schedules, lr_per_image, sweep, sweep8, clutter2x = {}, {}, {}, {}, {}
    paths = sorted(glob.glob(os.path.join(REPO, "configs", grid, "*", "*.yaml")))
    assert paths
    for path in paths:
        m = CPU_GRID_LEAF.match(os.path.basename(path))
        norm, batch, variant = m["norm"], int(m["batch"]), m["variant"] or ""
        cfg = load_cfg(path)
        s = cfg.SOLVER
        assert cfg.MODEL.RESNETS.NORM == norm and cfg.MODEL.DEVICE == "cpu"
        task = "frn_synthetic_clutter" if variant.startswith("clutter") else "frn_synthetic"  # the study's task arms
        assert cfg.DATASETS.TRAIN == (f"{task}_train",) and cfg.DATASETS.TEST == (f"{task}_val",)
        assert s.IMS_PER_BATCH == batch and s.REFERENCE_WORLD_SIZE == 1
        assert cfg.TEST.EVAL_PERIOD * 4 == s.MAX_ITER  # four points on the learning curve
        at_sweep_batch = variant.startswith("lr") and batch != 8
        schedules.setdefault("sweep" if at_sweep_batch else "grid", set()).add(
            (s.MAX_ITER * batch, s.WARMUP_ITERS * batch, tuple(x * batch for x in s.STEPS), cfg.TEST.EVAL_PERIOD * batch))
        per_image = round(s.BASE_LR / batch, 12)
        if at_sweep_batch:
            sweep.setdefault(norm, set()).add(per_image)
        elif variant.startswith("lr"):
            sweep8.setdefault(norm, set()).add(per_image)
        elif not variant and "retinanet" in path:
            lr_per_image.setdefault(norm, set()).add(per_image)
        elif variant == "clutter-2xlr":
            clutter2x[norm] = per_image
    assert all(len(v) == 1 for v in schedules.values()), schedules
    if "grid" in schedules:  # the grid trains as the sweep did (warm-up, decays), then longer at the last rate
        (grid_images, *grid_rest), = schedules["grid"]
        (sweep_images, *sweep_rest), = schedules["sweep"]
        assert grid_rest[:2] == sweep_rest[:2] and grid_images >= sweep_images
    assert all(len(v) == 1 for v in lr_per_image.values()), lr_per_image
    for norm, lr in clutter2x.items():  # twice the norm's grid rate
        assert {lr / 2} == lr_per_image[norm]
    assert set(sweep) == {"BN", "GN", "FRN"}
    for norm, lrs in sweep.items():
        assert len(lrs) >= 3 and max(lrs) / min(lrs) >= 4
        if norm in lr_per_image:
            assert lr_per_image[norm] <= lrs  # the grid runs at a swept rate
    for norm, lrs in sweep8.items():  # fractions of the linear rule, extended where the lowest won
        (linear,) = lr_per_image[norm]
        fractions = large_batch_fractions(norm)
        assert sorted(round(lr / linear, 6) for lr in lrs) == sorted(float(Fraction(f)) for f in fractions)
        assert {"1/4", "1/2"} <= set(fractions)


@pytest.mark.parametrize("rel", LEAVES)
def test_leaf(rel):
    fam, norm, ipg = parse(rel)
    cfg = load(rel)
    base = load(FAMILY_BASE[fam])
    s, b = cfg.SOLVER, base.SOLVER
    arch = cfg.MODEL.META_ARCHITECTURE
    assert arch == ("RetinaNet" if fam.startswith("retinanet") else "GeneralizedRCNN")
    assert cfg.MODEL.RESNETS.DEPTH == DEPTH[fam]

    # norm in every place
    places = NORM_KEYS[arch]
    if norm == "BN-finetuned":
        assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and all(cfg.MODEL[k].NORM == "" for k in places[1:])
        assert cfg.MODEL.WEIGHTS.endswith(f"R-{DEPTH[fam]}.pkl") and cfg.MODEL.BACKBONE.FREEZE_AT == 2
        assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 and list(cfg.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]
    else:
        assert {k: cfg.MODEL[k].NORM for k in places} == {k: norm for k in places}
        assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.BACKBONE.FREEZE_AT == 0  # from scratch
        assert not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    if arch == "GeneralizedRCNN":
        assert cfg.MODEL.MASK_ON
        assert (cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1)
        assert cfg.MODEL.ROI_MASK_HEAD.NUM_CONV == 4

    # images per GPU, held fixed through the reference world size
    assert s.REFERENCE_WORLD_SIZE == 8
    assert s.IMS_PER_BATCH % s.REFERENCE_WORLD_SIZE == 0
    assert s.IMS_PER_BATCH // s.REFERENCE_WORLD_SIZE == ipg
    assert b.IMS_PER_BATCH == 64 and b.REFERENCE_WORLD_SIZE == 8

    # linear rule relative to the family base: lr / batch constant; iterations x batch constant
    r = s.IMS_PER_BATCH / b.IMS_PER_BATCH
    assert math.isclose(s.BASE_LR, b.BASE_LR * r, rel_tol=1e-9)
    assert s.MAX_ITER * s.IMS_PER_BATCH == b.MAX_ITER * b.IMS_PER_BATCH
    assert len(s.STEPS) == len(b.STEPS)
    assert [x * s.IMS_PER_BATCH for x in s.STEPS] == [x * b.IMS_PER_BATCH for x in b.STEPS]
    assert s.WARMUP_ITERS * s.IMS_PER_BATCH == b.WARMUP_ITERS * b.IMS_PER_BATCH > 0
    assert s.CHECKPOINT_PERIOD * s.IMS_PER_BATCH == b.CHECKPOINT_PERIOD * b.IMS_PER_BATCH
    # the paper's 4e-4 for RetinaNet; detectron2's scratch 9x 1e-4 for Mask R-CNN, whose schedule it uses
    assert s.WEIGHT_DECAY == (4e-4 if fam.startswith("retinanet") else 1e-4)
    assert s.WARMUP_METHOD == "linear" and s.MOMENTUM == 0.9
    assert s.WEIGHT_DECAY_NORM == 0.0 and cfg.TEST.EVAL_PERIOD == 0


def test_paper_numbers():
    # FRN paper: steps = 125000 * 64 / batch, lr = base_lr * batch / 64 (RetinaNet, 8 GPUs)
    for ipg in (1, 2, 4, 8, 16):
        s = load(f"retinanet_R_101_FPN/FRN_{ipg}img.yaml").SOLVER
        batch = 8 * ipg
        assert (s.IMS_PER_BATCH, s.MAX_ITER) == (batch, 125000 * 64 // batch)
        assert math.isclose(s.BASE_LR, 0.05 * batch / 64)
    # Mask R-CNN at 2 images/GPU = detectron2's batch 16 with its standard lr 0.02
    s = load("mask_rcnn_R_50_FPN/GN_2img.yaml").SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS)) == (16, 0.02, 810000, (750000, 790000))


@pytest.mark.parametrize("gpus", [1, 2, 16])
def test_auto_scaling_keeps_images_per_gpu(gpus):
    cfg = load("retinanet_R_50_FPN/FRN_4img.yaml")
    scaled = DefaultTrainer.auto_scale_workers(cfg, gpus)
    s = scaled.SOLVER
    assert s.IMS_PER_BATCH == 4 * gpus and s.REFERENCE_WORLD_SIZE == gpus
    assert s.MAX_ITER * s.IMS_PER_BATCH == cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH
    assert math.isclose(s.BASE_LR / s.IMS_PER_BATCH, cfg.SOLVER.BASE_LR / cfg.SOLVER.IMS_PER_BATCH)


# ---- built models (CPU, no weights). The norm placement is inherited from Base-<NORM>.yaml and
# does not depend on images per GPU (test_leaf checks every leaf's norm keys), so one leaf per
# (family, norm) is built; the images per GPU rotate so every batch file is built at least once.
BUILDS = [("retinanet_R_50_FPN", "BN", 1), ("retinanet_R_50_FPN", "SyncBN", 2), ("retinanet_R_50_FPN", "GN", 4),
          ("retinanet_R_50_FPN", "FRN", 16), ("retinanet_R_50_FPN", "BN-finetuned", 8),
          ("retinanet_R_101_FPN", "BN", 16), ("retinanet_R_101_FPN", "SyncBN", 8), ("retinanet_R_101_FPN", "GN", 2),
          ("retinanet_R_101_FPN", "FRN", 1), ("retinanet_R_101_FPN", "BN-finetuned", 8),
          ("mask_rcnn_R_50_FPN", "BN", 4), ("mask_rcnn_R_50_FPN", "SyncBN", 16), ("mask_rcnn_R_50_FPN", "GN", 8),
          ("mask_rcnn_R_50_FPN", "FRN", 2), ("mask_rcnn_R_50_FPN", "BN-finetuned", 8)]


def _conv_norms(module):
    return [m.norm for m in module.modules() if isinstance(m, Conv2d)]


def _check(norms, expected, where, count=None):
    if count is not None:
        assert len(norms) == count, f"{where}: {len(norms)} norms, expected {count}"
    for n in norms:
        if expected is None:
            assert n is None, f"{where}: unexpected norm {type(n).__name__}"
        else:
            assert type(n) is expected, f"{where}: {type(n).__name__}, expected {expected.__name__}"


@pytest.mark.parametrize("fam,norm,ipg", BUILDS, ids=[f"{f}-{n}-{i}" for f, n, i in BUILDS])
def test_build_norm_in_every_place(fam, norm, ipg):
    cfg = load(f"{fam}/{norm}_{ipg}img.yaml")
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    backbone_norm = NORM_CLASS["FrozenBN" if norm == "BN-finetuned" else norm]
    other_norm = None if norm == "BN-finetuned" else NORM_CLASS[norm]

    bottom_up = model.backbone.bottom_up
    n_blocks = {50: 3 + 4 + 6 + 3, 101: 3 + 4 + 23 + 3}[DEPTH[fam]]
    # stem + 3 convs per bottleneck + 4 projection shortcuts (res5 included)
    _check(_conv_norms(bottom_up), backbone_norm, "backbone", count=1 + 3 * n_blocks + 4)
    fpn_convs = list(model.backbone.lateral_convs) + list(model.backbone.output_convs)
    _check([c.norm for c in fpn_convs], other_norm, "FPN", count=len(cfg.MODEL.FPN.IN_FEATURES) * 2)

    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        for name in ("cls_subnet", "bbox_subnet"):
            subnet = getattr(model.head, name)
            norms = [m for m in subnet if not isinstance(m, (nn.Conv2d, nn.ReLU, nn.Identity))]
            if other_norm is None:
                assert norms == [], f"head {name}: {norms}"
                continue
            assert len(norms) == cfg.MODEL.RETINANET.NUM_CONVS, f"head {name}: {norms}"
            if norm in ("BN", "SyncBN"):  # one BN per FPN level (detectron2's CycleBatchNormList)
                assert all(type(n) is CycleBatchNormList for n in norms)
                _check([bn for n in norms for bn in n], other_norm, f"head {name}")
            else:
                _check(norms, other_norm, f"head {name}")
            if norm == "FRN":  # FRN + TLU replaces norm + ReLU
                assert all(n.tau is not None for n in norms)
                assert not any(isinstance(m, nn.ReLU) for m in subnet)
    else:
        _check([c.norm for c in model.roi_heads.box_head.conv_norm_relus], other_norm, "box head", count=4)
        _check([c.norm for c in model.roi_heads.mask_head.conv_norm_relus], other_norm, "mask head", count=4)

    # and no other kind of norm anywhere (CycleBatchNormList holds BN2d / SyncBN)
    kinds = {type(m) for m in model.modules() if isinstance(m, NORM_TYPES)}
    assert kinds == {backbone_norm}, kinds


def test_grid_variants_run_at_every_batch_at_the_study_rate():
    """A study arm promoted to the grid (grid.yaml's grid_variants) has a leaf at each of the grid's
    batches, all at the arm's lr per image and with the arm's config lines, on the grid's schedule."""
    from experiments.cpu_grid.configs import GRID_DIR, grid_variants, settings
    variants = grid_variants()
    assert {name for _, _, _, name, _, _ in variants} == set(settings()["grid_variants"])
    for rel, norm, batch, name, lr, arm in variants:
        cfg = load_cfg(os.path.join(GRID_DIR, rel))
        grid_cell = load_cfg(os.path.join(GRID_DIR, f"retinanet_R18_FPN/{norm}_{batch}img.yaml"))
        assert round(cfg.SOLVER.BASE_LR / batch, 12) == float(Fraction(lr))
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (grid_cell.SOLVER.MAX_ITER, grid_cell.SOLVER.STEPS)
        assert_config_lines_hold(cfg, arm["config"])


def assert_config_lines_hold(node, tree):
    """Each line of the nested {KEY: value} ``tree`` holds in the config ``node``."""
    for key, value in tree.items():
        if isinstance(value, dict):
            assert_config_lines_hold(node[key], value)
        else:
            assert node[key] == (tuple(value) if isinstance(value, list) else value), key

"""The generated COCO config grid: configs/coco/ (norms x images per GPU, from scratch). Written by
`python -m experiments.gen_configs` (`--check` compares instead); this module is its single source,
and tests/test_configs.py checks that the committed YAMLs equal its output.

Layout (every file inherits through a relative `_BASE_`; detectron2's stock bases are reached
through configs/Base-RetinaNet.yaml and configs/Base-RCNN-FPN.yaml, copies of the model zoo's,
because fvcore joins every `_BASE_` that does not start with "/", "http://" or "https://" to the
including file's folder, so no relative or "detectron2://" path can reach an installed package):

    configs/coco/Base-Scratch.yaml              from-scratch protocol shared by all families
    configs/coco/<family>/Base.yaml             the family: architecture + ONE reference schedule
                                                (8 GPUs x 8 images = total batch 64)
    configs/coco/<family>/Base-<NORM>.yaml      where the norm goes (backbone, FPN, heads)
    configs/coco/<family>/<NORM>_<i>img.yaml    leaf: i images per GPU, schedule scaled
    configs/coco/<family>/BN-finetuned_8img.yaml   BN*: ImageNet-pretrained FrozenBN backbone
    configs/coco/retinanet_R_101_FPN/*.yaml     each inherits its R50 namesake and sets depth 101

Schedule rule (the FRN paper's, applied to every family): with total batch B = i * 8,
    BASE_LR = base_lr * B / 64,  MAX_ITER, STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD = base * 64 / B
so iterations x batch (images seen) and lr / batch stay constant, and warm-up covers the same
number of images. SOLVER.REFERENCE_WORLD_SIZE = 8 keeps i images per GPU on other GPU counts
(DefaultTrainer.auto_scale_workers rescales batch, lr and iterations by the same rule).
"""
import os
from fractions import Fraction

from ..generated import HEADER, fmt_lr, fmt_steps
from ..paths import CONFIGS

OUT_DIR = os.path.join(CONFIGS, "coco")

REFERENCE_WORLD_SIZE = 8  # the paper trains on 8 GPUs
REFERENCE_BATCH = 64  # the paper's reference total batch (8 GPUs x 8 images)
IMAGES_PER_GPU = (1, 2, 4, 8, 16)
NORMS = ("BN", "SyncBN", "GN", "FRN")  # trained from scratch; BN* is the fine-tuned reference
BN_FINETUNED_IMAGES_PER_GPU = 8  # the paper's fine-tuned BN reference is at batch 64

# Family schedules at the reference batch 64. These are the ONLY schedule numbers; every leaf
# is derived from them by the linear rule above.
FAMILIES = {
    "retinanet_R_50_FPN": {
        "title": "RetinaNet R50-FPN",
        "stock_base": "../../Base-RetinaNet.yaml",
        "depth": 50,
        # FRN paper (RetinaNet from scratch): 125000 steps at batch 64, weight decay 4e-4, lr the
        # best of {0.01, 0.05, 0.1} per setting (configs/coco/README.md: the sweep command); 0.05
        # is the default, the grid value nearest detectron2's RetinaNet lr scaled linearly to
        # batch 64 (0.01 x 64 / 16 = 0.04). frn-det's choices, not the paper's (which does not
        # give them): decays 15k and 5k iterations before the end, as detectron2's from-scratch 9x
        # Mask R-CNN; warm-up 2000 iterations (128k images, 1.6%): FRN has no mean centring.
        "base_lr": "0.05",
        "weight_decay": "0.0004",
        "max_iter": 125000,
        "steps": (110000, 120000),
        "warmup_iters": 2000,
        "checkpoint_period": 5000,
        "norm_places": ("RESNETS", "FPN", "RETINANET"),
        "weights": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    },
    "mask_rcnn_R_50_FPN": {
        "title": "Mask R-CNN R50-FPN (4conv1fc box head)",
        "stock_base": "../../Base-RCNN-FPN.yaml",
        "depth": 50,
        # detectron2's scratch_mask_rcnn_R_50_FPN_9x_{gn,syncbn}: batch 64, lr 0.08, weight decay
        # 1e-4, 202500 iterations, decays at 187500 and 197500; warm-up 1000 iterations (its
        # default). Comparable to the zoo's 43.7 (GN) / 43.6 (SyncBN) box AP at 8 images per GPU.
        "base_lr": "0.08",
        "weight_decay": "0.0001",
        "max_iter": 202500,
        "steps": (187500, 197500),
        "warmup_iters": 1000,
        "checkpoint_period": 5000,
        "norm_places": ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"),
        "weights": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    },
}
# Same schedule base as its R50 namesake (the paper's RetinaNet schedule is for R101).
DEPTH_VARIANTS = {"retinanet_R_101_FPN": ("retinanet_R_50_FPN", 101, "RetinaNet R101-FPN",
                                          "detectron2://ImageNetPretrained/MSRA/R-101.pkl")}

NORM_TITLES = {
    "BN": "BatchNorm with per-GPU statistics",
    "SyncBN": "SyncBatchNorm (statistics over all GPUs)",
    "GN": "GroupNorm (32 groups)",
    "FRN": "FRN + TLU (FRN alone where no activation follows)",
}


def scaled_schedule(fam, images_per_gpu):
    """The schedule of `fam` (a FAMILIES entry) at `images_per_gpu` x REFERENCE_WORLD_SIZE.

    Returns a dict with IMS_PER_BATCH, BASE_LR, MAX_ITER, STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD.
    Raises ValueError if an iteration count would not be an integer.
    """
    batch = images_per_gpu * REFERENCE_WORLD_SIZE
    factor = Fraction(batch, REFERENCE_BATCH)

    def iters(n):
        v = Fraction(n) / factor
        if v.denominator != 1:
            raise ValueError(f"{n} iterations at batch {REFERENCE_BATCH} is not an integer at {batch}")
        return int(v)

    return {
        "IMS_PER_BATCH": batch,
        "BASE_LR": float(Fraction(fam["base_lr"]) * factor),
        "MAX_ITER": iters(fam["max_iter"]),
        "STEPS": tuple(iters(s) for s in fam["steps"]),
        "WARMUP_ITERS": iters(fam["warmup_iters"]),
        "CHECKPOINT_PERIOD": iters(fam["checkpoint_period"]),
    }


def scratch_base():
    return HEADER + f"""\
# From-scratch protocol of the FRN paper (Singh & Krishnan 2020, COCO detection), shared by every
# family under configs/coco/. Families add the architecture and their reference schedule.
MODEL:
  WEIGHTS: ""  # random initialisation
  BACKBONE:
    FREEZE_AT: 0  # nothing frozen when training from scratch
  RESNETS:
    # torchvision-style bottleneck (stride in the 3x3), as detectron2's scratch configs; the paper's
    # ResNetV1 strides in the 1x1: a small difference in every norm's model alike.
    STRIDE_IN_1X1: False
  # Divide by the pixel std when training from scratch (detectron2's scratch 9x configs do).
  PIXEL_STD: [57.375, 57.12, 58.395]
SOLVER:
  IMS_PER_BATCH: {REFERENCE_BATCH}  # reference batch: {REFERENCE_WORLD_SIZE} GPUs x {REFERENCE_BATCH // REFERENCE_WORLD_SIZE} images
  # Leaves set IMS_PER_BATCH = images per GPU x {REFERENCE_WORLD_SIZE}; on another GPU count
  # DefaultTrainer.auto_scale_workers keeps the images per GPU and rescales lr and iterations.
  REFERENCE_WORLD_SIZE: {REFERENCE_WORLD_SIZE}
  MOMENTUM: 0.9
  # WEIGHT_DECAY: per family (Base.yaml)
  # No decay on norm parameters (BN/GN gamma, beta; FRN gamma, beta, tau, eps through
  # frn_det.build_optimizer), identical for every norm.
  WEIGHT_DECAY_NORM: 0.0
  WARMUP_METHOD: "linear"
  WARMUP_FACTOR: 0.001  # ramp from ~0
"""


def family_base(name, fam):
    lr_note = "lr = {} x B / {}".format(fam["base_lr"], REFERENCE_BATCH)
    mrcnn = ""
    if "ROI_BOX_HEAD" in fam["norm_places"]:
        mrcnn = """\
  MASK_ON: True
  ROI_BOX_HEAD:
    NUM_CONV: 4  # 4conv1fc box head, so that the norm also sits in the box head
    NUM_FC: 1
"""
    return HEADER + f"""\
# {fam["title"]} trained from scratch: the family's reference schedule at total batch
# {REFERENCE_BATCH} ({REFERENCE_WORLD_SIZE} GPUs x {REFERENCE_BATCH // REFERENCE_WORLD_SIZE} images). Leaves at total batch B scale it linearly:
# {lr_note}, iterations (MAX_ITER, STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD) x {REFERENCE_BATCH} / B.
# No norm here (detectron2's default FrozenBN would be wrong from scratch): use a Base-<NORM>.yaml.
_BASE_: ["{fam["stock_base"]}", "../Base-Scratch.yaml"]
MODEL:
{mrcnn}  RESNETS:
    DEPTH: {fam["depth"]}
SOLVER:
  BASE_LR: {fam["base_lr"]}
  WEIGHT_DECAY: {fam["weight_decay"]}
  MAX_ITER: {fam["max_iter"]}
  STEPS: {fmt_steps(fam["steps"])}
  WARMUP_ITERS: {fam["warmup_iters"]}
  CHECKPOINT_PERIOD: {fam["checkpoint_period"]}
"""


def norm_base(fam, norm):
    lines = [HEADER, f"# {fam['title']} from scratch, {NORM_TITLES[norm]} in every place:\n"]
    lines.append("# " + ", ".join(fam["norm_places"]) + ".\n")
    lines.append('_BASE_: "Base.yaml"\nMODEL:\n')
    for place in fam["norm_places"]:
        lines.append(f'  {place}:\n    NORM: "{norm}"\n')
    return "".join(lines)


def leaf(fam, norm, images_per_gpu):
    s = scaled_schedule(fam, images_per_gpu)
    b = s["IMS_PER_BATCH"]
    text = HEADER + (
        f"# {fam['title']} from scratch, {norm}, {images_per_gpu} image{'s' if images_per_gpu > 1 else ''} per GPU "
        f"(x {REFERENCE_WORLD_SIZE} GPUs = batch {b}).\n"
        f'_BASE_: "Base-{norm}.yaml"\n'
    )
    if b == REFERENCE_BATCH:
        return text + "# Reference batch: the schedule of Base.yaml unchanged.\n"
    f = Fraction(b, REFERENCE_BATCH)
    return text + f"""\
SOLVER:  # Base.yaml's schedule x {f} (lr) and x {1 / f} (iterations)
  IMS_PER_BATCH: {b}
  BASE_LR: {fmt_lr(s["BASE_LR"])}
  MAX_ITER: {s["MAX_ITER"]}
  STEPS: {fmt_steps(s["STEPS"])}
  WARMUP_ITERS: {s["WARMUP_ITERS"]}
  CHECKPOINT_PERIOD: {s["CHECKPOINT_PERIOD"]}
"""


def bn_finetuned(fam):
    i = BN_FINETUNED_IMAGES_PER_GPU
    assert i * REFERENCE_WORLD_SIZE == REFERENCE_BATCH
    return HEADER + f"""\
# BN*: a BN reference at the reference batch ({i} images per GPU x {REFERENCE_WORLD_SIZE} GPUs): ImageNet-pretrained
# backbone with frozen BN statistics and affine parameters (FrozenBN, as detectron2's model zoo),
# no norm in FPN or heads, the same schedule as the from-scratch runs. Not the paper's BN* (BN
# fine-tuned at batch 64, 38.3 AP for RetinaNet R101): this is detectron2's usual pretrained
# baseline, for scale.
_BASE_: "Base.yaml"
MODEL:
  WEIGHTS: "{fam["weights"]}"
  PIXEL_STD: [1.0, 1.0, 1.0]  # MSRA weights: BGR, unit std
  BACKBONE:
    FREEZE_AT: 2  # stem and res2 frozen, as the model zoo
  RESNETS:
    NORM: "FrozenBN"
    STRIDE_IN_1X1: True  # MSRA weights have the stride in the 1x1
"""


def depth_variant(name, src, depth, title, weights, filename):
    kind = filename[: -len(".yaml")]
    text = HEADER + f'# {title}: {src}/{filename} with a ResNet-{depth} backbone.\n'
    text += f'_BASE_: "../{src}/{filename}"\nMODEL:\n'
    if kind.startswith("BN-finetuned"):
        text += f'  WEIGHTS: "{weights}"\n'
    return text + f"  RESNETS:\n    DEPTH: {depth}\n"


def leaf_name(norm, images_per_gpu):
    return f"{norm}_{images_per_gpu}img.yaml"


def readme():
    lines = [
        "# COCO configs: norms x images per GPU, from scratch\n\n",
        "Generated by `python -m experiments.gen_configs` (experiments/coco/configs.py's docstring explains the layout); "
        "`tests/test_configs.py` checks the files equal its output and follow the rule below.\n\n",
        "- Families: RetinaNet R50-FPN, RetinaNet R101-FPN (same schedule base as R50), Mask R-CNN R50-FPN "
        "(4conv1fc box head). Norms `BN` (per-GPU statistics), `SyncBN`, `GN`, `FRN` (FRN + TLU, "
        "`import frn_det` first) in backbone, FPN and heads, trained from scratch. "
        "`BN-finetuned_8img.yaml` is a BN reference for scale: detectron2's ImageNet-pretrained FrozenBN "
        "backbone, no norm in FPN/heads, the same schedule; it is not the paper's BN* (BN fine-tuned at "
        "batch 64, 38.3 AP for RetinaNet R101).\n",
        f"- `<NORM>_<i>img.yaml` trains with i images per GPU on {REFERENCE_WORLD_SIZE} GPUs "
        f"(`SOLVER.REFERENCE_WORLD_SIZE: {REFERENCE_WORLD_SIZE}`). On another GPU count detectron2's "
        "`DefaultTrainer.auto_scale_workers` keeps i images per GPU and rescales batch, lr and iterations "
        "by the same linear rule.\n",
        f"- Rule (FRN paper): total batch B = {REFERENCE_WORLD_SIZE} i; lr = base_lr x B / {REFERENCE_BATCH}; "
        f"MAX_ITER, STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD = base x {REFERENCE_BATCH} / B. Images seen "
        "and warm-up images are the same for every leaf of a family.\n",
        "- Common protocol (`Base-Scratch.yaml`): random init, nothing frozen, SGD momentum 0.9, no "
        "weight decay on norm parameters, linear warm-up from 0.001 x lr. Weight decay: RetinaNet 4e-4 "
        "(the paper's), Mask R-CNN 1e-4 (detectron2's scratch 9x recipe, whose schedule it uses, so its "
        "results compare with the model zoo's 43.7 GN / 43.6 SyncBN). Input: detectron2's standard "
        "multi-scale 640-800 / 1333, not the paper's 1024x1024 crops.\n",
        "- Our choices where the paper gives none: RetinaNet's decay points (15k and 5k iterations "
        "before the end at batch 64) and warm-up (2000 iterations at batch 64). STRIDE_IN_1X1 False "
        "(detectron2's scratch configs) where the paper's ResNetV1 strides in the 1x1: the same for every norm.\n",
        "- Learning rate per norm: `base_lr` (0.05 for RetinaNet, 0.08 for Mask R-CNN, per 64 images) is "
        "a default, not each norm's best. The paper takes the best of {0.01, 0.05, 0.1} per 64 images for "
        "every setting; the sweep, for one leaf (override BASE_LR by the linear rule for other batches):\n\n"
        "  ```bash\n"
        "  for lr in 0.01 0.05 0.1; do\n"
        "    python -m experiments.compare_ap grid --configs configs/coco/retinanet_R_50_FPN/FRN_8img.yaml --seeds 0 \\\n"
        "      --root output/coco_lr$lr --out output/coco_lr$lr/ap --opts SOLVER.BASE_LR $lr\n"
        "  done\n"
        "  ```\n\n",
    ]
    for name, fam in FAMILIES.items():
        lines.append(f"## {fam['title']}" + (" and R101-FPN" if name == "retinanet_R_50_FPN" else "") + "\n\n")
        lines.append("| images/GPU | total batch | BASE_LR | MAX_ITER | STEPS | WARMUP_ITERS |\n")
        lines.append("|---|---|---|---|---|---|\n")
        for i in IMAGES_PER_GPU:
            sch = scaled_schedule(fam, i)
            lines.append(f"| {i} | {sch['IMS_PER_BATCH']} | {fmt_lr(sch['BASE_LR'])} | {sch['MAX_ITER']} | "
                         f"{fmt_steps(sch['STEPS'])} | {sch['WARMUP_ITERS']} |\n")
        lines.append("\n")
    return "".join(lines).rstrip("\n") + "\n"


def render_all():
    """Every generated file: {path relative to configs/coco: text}."""
    out = {"README.md": readme(), "Base-Scratch.yaml": scratch_base()}
    for name, fam in FAMILIES.items():
        out[f"{name}/Base.yaml"] = family_base(name, fam)
        for norm in NORMS:
            out[f"{name}/Base-{norm}.yaml"] = norm_base(fam, norm)
            for i in IMAGES_PER_GPU:
                out[f"{name}/{leaf_name(norm, i)}"] = leaf(fam, norm, i)
        out[f"{name}/BN-finetuned_{BN_FINETUNED_IMAGES_PER_GPU}img.yaml"] = bn_finetuned(fam)
    for name, (src, depth, title, weights) in DEPTH_VARIANTS.items():
        for rel in list(out):
            fam_dir, filename = os.path.split(rel)
            if fam_dir == src and not filename.startswith("Base"):
                out[f"{name}/{filename}"] = depth_variant(name, src, depth, title, weights, filename)
    return out


def family_of(config_relpath):
    """The FAMILIES entry whose schedule governs configs/coco/<config_relpath>."""
    fam_dir = config_relpath.split("/")[0]
    if fam_dir in DEPTH_VARIANTS:
        fam_dir = DEPTH_VARIANTS[fam_dir][0]
    return FAMILIES[fam_dir]


# (output folder, renderer) of the COCO grid
TARGETS = ((OUT_DIR, render_all),)

"""MODEL.FRN: the config keys (``add_frn_config``) and their validated, typed form (``FRNOptions``);
also the data checks' keys DATASETS.CHECK_IMAGES / CHECK_NUM_CLASSES (frn_det.data.validation)."""
import dataclasses
from typing import Optional

from detectron2.config import CfgNode as CN

from ..data.validation import DEFAULT_CHECK_IMAGES
from ..layers.filter_response_norm import IMPLS

LEARNED_EPS_MODES = ("auto", "all", "none")
ACTIVATIONS = ("TLU", "RELU")


def add_frn_config(cfg):
    """Add the MODEL.FRN options read when a model with the norm name "FRN" is built.

    Also adds DATASETS.CHECK_IMAGES and DATASETS.CHECK_NUM_CLASSES, the checks frn_det's trainer
    runs on the data before training (frn_det.data.validation).

    Mutates ``cfg`` in place; calling it again keeps the values already set. Models built from a
    config without these keys use the defaults below.
    """
    _add_data_check_config(cfg)
    if "FRN" in cfg.MODEL:
        return
    cfg.MODEL.FRN = CN()
    # Fixed epsilon added to the mean square nu^2 of every FRN layer.
    cfg.MODEL.FRN.EPS = 1e-6
    # Where FRN layers also learn a scalar eps_l (init 1e-4; effective eps = EPS + |eps_l|), the
    # paper's remedy for 1x1 planes, on which FRN with a tiny fixed eps degenerates to sign(x):
    # "auto": only where planes can be 1x1 -- the RetinaNet head, shared by P3-P7 (P7 has stride
    #         128, so it is 1x1 on images up to 128 px and a few pixels wide on most others);
    #         backbone, FPN and ROI-head planes (7x7 / 14x14 ROIs) keep the fixed eps;
    # "all":  every FRN layer; "none": no FRN layer.
    cfg.MODEL.FRN.LEARNED_EPS = "auto"
    # "TLU": FRN + TLU where detectron2 has norm + ReLU, and a TLU replaces the ReLU after each
    #        residual add (the paper's FRN layer);
    # "RELU": FRN without TLU everywhere, detectron2's ReLUs kept (the paper's TLU ablation).
    cfg.MODEL.FRN.ACTIVATION = "TLU"
    # FRN implementation: "op" (fused custom op, frn_det._C), "reference" (plain PyTorch) or
    # "auto" (the environment variable FRN_DET_IMPL if set, else the op when frn_det._C is built,
    # else the reference). Resolved once per layer, when the model is built.
    cfg.MODEL.FRN.IMPL = "auto"
    # Variants (docs/results.md, "Why FRN trails GN"); the defaults are the paper's FRN. NUM_GROUPS > 0
    # runs FRN in the reference implementation ("op" is rejected, "auto" picks the reference);
    # CENTERED with NUM_GROUPS 0 runs the fused centred op on CPU inputs ("op" or "auto"; on CUDA,
    # which has no centred kernels yet, "auto" runs the reference and "op" raises NotImplementedError).
    # NUM_GROUPS: 0 = one statistic per sample and channel (FRN); G > 0 = pooled over G groups of
    #             C/G channels, as GroupNorm (32 is GN's); G must divide every FRN layer's channels.
    cfg.MODEL.FRN.NUM_GROUPS = 0
    # CENTERED: subtract the plane's (group's) mean and divide by its standard deviation, then the
    #           affine and TLU as placed (InstanceNorm per channel, GroupNorm + TLU with NUM_GROUPS 32).
    cfg.MODEL.FRN.CENTERED = False
    # For every norm, not only FRN: zero-initialise the scale (gamma) of the last norm in each
    # residual branch (BasicBlock conv2, BottleneckBlock conv3), so that every block starts as its
    # shortcut (Goyal et al. 2017; tensorpack's FRN reproduction). detectron2 does not (its resnet.py
    # notes it hurt GN from scratch); off by default.
    cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL = False


def _add_data_check_config(cfg):
    # Checked before the first iteration (and before --eval-only evaluates); none draws random
    # numbers or changes the data, so runs on valid data are the same with or without them.
    # CHECK_IMAGES: what is checked of every image file of DATASETS.TRAIN and DATASETS.TEST:
    #   "none";
    #   "headers": the file opens as an image, and its size from the header (after the EXIF
    #              orientation) is the json's width/height (0.06-0.14 s per 1000 images);
    #   "decode":  also decodes every pixel, finding truncated and corrupt files (2.2-4.8 s per 1000
    #              640x480 JPEGs and process; README.md, "Data checks").
    #   All bad files are reported in one error. Default "headers": almost free, and a truncated
    #   file it misses is named (file and dataset) when training reads it; check a new dataset
    #   once with decode (tools/train_net.py --check-data-only) rather than on every run and resume.
    if "CHECK_IMAGES" not in cfg.DATASETS:
        cfg.DATASETS.CHECK_IMAGES = DEFAULT_CHECK_IMAGES
    # CHECK_NUM_CLASSES: the number of classes of each head the model builds (MODEL.RETINANET.NUM_CLASSES,
    #   or MODEL.ROI_HEADS.NUM_CLASSES for the ROI box and mask heads) must be the number of
    #   categories of every training and test dataset. Metadata only; False allows a deliberate mismatch.
    if "CHECK_NUM_CLASSES" not in cfg.DATASETS:
        cfg.DATASETS.CHECK_NUM_CLASSES = True


@dataclasses.dataclass(frozen=True)
class FRNOptions:
    """MODEL.FRN in typed form; see :func:`add_frn_config` for the meaning of each field.

    Invalid values raise a ValueError naming the MODEL.FRN key.
    """

    eps: float = 1e-6
    learned_eps: str = "auto"
    activation: str = "TLU"
    impl: str = "auto"
    num_groups: int = 0
    centered: bool = False

    def __post_init__(self):
        for key, value, valid in (("LEARNED_EPS", self.learned_eps, LEARNED_EPS_MODES),
                                  ("ACTIVATION", self.activation, ACTIVATIONS), ("IMPL", self.impl, IMPLS)):
            if value not in valid:
                raise ValueError(f"MODEL.FRN.{key} must be one of {valid}, got {value!r}")
        if not isinstance(self.eps, (int, float)) or not self.eps >= 0:
            raise ValueError(f"MODEL.FRN.EPS must be a number >= 0, got {self.eps!r}")
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups < 0:
            raise ValueError(f"MODEL.FRN.NUM_GROUPS must be 0 (per channel) or a positive group count, got {self.num_groups!r}")
        if not isinstance(self.centered, bool):
            raise ValueError(f"MODEL.FRN.CENTERED must be True or False, got {self.centered!r}")
        if self.impl == "op" and self.num_groups != 0:
            raise ValueError("MODEL.FRN.IMPL 'op' computes per-channel statistics (the paper's FRN and CENTERED); "
                             "MODEL.FRN.NUM_GROUPS runs in the reference implementation (IMPL 'reference' or 'auto')")

    @property
    def is_variant(self) -> bool:
        """True when the statistics differ from the paper's FRN (grouped or centred)."""
        return self.num_groups != 0 or self.centered

    @classmethod
    def from_cfg(cls, cfg) -> Optional["FRNOptions"]:
        """The options in ``cfg.MODEL.FRN``; None when the cfg has no such node."""
        node = getattr(getattr(cfg, "MODEL", None), "FRN", None)
        if node is None:
            return None
        return cls(eps=node.EPS, learned_eps=node.LEARNED_EPS, activation=node.ACTIVATION, impl=node.IMPL,
                   num_groups=node.get("NUM_GROUPS", 0), centered=node.get("CENTERED", False))

"""MODEL.FRN: the config keys (``add_frn_config``) and their validated, typed form (``FRNOptions``)."""
import dataclasses
from typing import Optional

from detectron2.config import CfgNode as CN

from ..layers.frn import IMPLS

LEARNED_EPS_MODES = ("auto", "all", "none")
ACTIVATIONS = ("TLU", "RELU")


def add_frn_config(cfg):
    """Add the MODEL.FRN options read when a model with the norm name "FRN" is built.

    Mutates ``cfg`` in place; calling it again keeps the values already set. Models built from a
    config without these keys use the defaults below.
    """
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


@dataclasses.dataclass(frozen=True)
class FRNOptions:
    """MODEL.FRN in typed form; see :func:`add_frn_config` for the meaning of each field.

    Invalid values raise a ValueError naming the MODEL.FRN key.
    """

    eps: float = 1e-6
    learned_eps: str = "auto"
    activation: str = "TLU"
    impl: str = "auto"

    def __post_init__(self):
        for key, value, valid in (("LEARNED_EPS", self.learned_eps, LEARNED_EPS_MODES),
                                  ("ACTIVATION", self.activation, ACTIVATIONS), ("IMPL", self.impl, IMPLS)):
            if value not in valid:
                raise ValueError(f"MODEL.FRN.{key} must be one of {valid}, got {value!r}")
        if not isinstance(self.eps, (int, float)) or not self.eps >= 0:
            raise ValueError(f"MODEL.FRN.EPS must be a number >= 0, got {self.eps!r}")

    @classmethod
    def from_cfg(cls, cfg) -> Optional["FRNOptions"]:
        """The options in ``cfg.MODEL.FRN``; None when the cfg has no such node."""
        node = getattr(getattr(cfg, "MODEL", None), "FRN", None)
        if node is None:
            return None
        return cls(eps=node.EPS, learned_eps=node.LEARNED_EPS, activation=node.ACTIVATION, impl=node.IMPL)

"""The one place where frn_det patches detectron2: it makes the norm name "FRN" work in stock
builders and stock model-zoo configs (MODEL.RESNETS.NORM, MODEL.FPN.NORM, MODEL.RETINANET.NORM,
MODEL.ROI_BOX_HEAD.NORM, MODEL.ROI_MASK_HEAD.NORM). Applied by ``import frn_det``; ``uninstall()``
restores detectron2 exactly.

detectron2's ``get_norm`` is a closed dict that every consumer binds by name at import, so
:func:`install` rebinds ``get_norm`` (and ``build_model`` / ``build_backbone``, to read MODEL.FRN
from the cfg being built) wherever a loaded module bound the stock function under that name:
detectron2's consumers and user modules that imported it before frn_det. Modules imported later
bind the patched names from ``detectron2.layers`` / ``detectron2.modeling``.

``get_norm("FRN", C)`` returns a ``FilterResponseNorm2d`` without TLU: a drop-in norm, followed by
whatever activation the consumer applies. With MODEL.FRN.ACTIVATION "TLU" (default) the ``__init__``
of these stock classes is wrapped to apply the paper's placement after the stock constructor ran:

=========================== ==================================================================
BasicStem                   conv1: FRN+TLU, no ReLU before the max-pool
BottleneckBlock (R50/R101)  conv1, conv2: FRN+TLU; conv3, shortcut: FRN; ``tlu``: TLU after the add
BasicBlock (R18/R34)        conv1: FRN+TLU; conv2, shortcut: FRN; ``tlu``: TLU after the add
RetinaNetHead               subnet norms: FRN+TLU; the nn.ReLU after each becomes nn.Identity
FastRCNNConvFCHead          conv norms: FRN+TLU; the Conv2d's ``activation`` (ReLU) removed
MaskRCNNConvUpsampleHead    same as the box head
FPN and other consumers     FRN (the stock get_norm call; nothing follows in FPN)
=========================== ==================================================================

Blocks that take the FRN placement change class to the ``FRN*`` subclasses below, whose forward
drops the ReLUs; every other instance keeps the stock class and code. Subclasses of these classes
(and DeformBottleneckBlock, RegNet, ...) get FRN as a drop-in norm, as in "RELU" mode.

Checkpoint keys (a BN/GN checkpoint's conv keys stay valid; nn.Identity keeps the subnet indices):
``<conv>.norm.{weight,bias}`` every FRN; ``<conv>.norm.tau`` FRN+TLU; ``<conv>.norm.eps_l`` learned
eps (RetinaNet head with LEARNED_EPS "auto"); ``backbone.bottom_up.res<k>.<i>.tlu.tau`` post-add TLU.
Models from ``build_model`` / ``build_backbone`` that contain FRN also log one line saying what a
BatchNorm checkpoint did to their FRN layers, besides detectron2's missing / unused key lists.
"""
import contextlib
import contextvars
import dataclasses
import functools
import logging
import sys
from typing import Optional

import torch.nn.functional as F
from torch import nn

import detectron2.modeling  # noqa: F401  (loads every stock consumer of get_norm before patching)
from detectron2.layers import batch_norm
from detectron2.modeling.backbone import build as backbone_build
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from detectron2.modeling.meta_arch import build as meta_arch_build
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

from .layers import TLU, FilterResponseNorm2d
from .layers.frn import IMPLS

__all__ = ["NORM_NAME", "FRNOptions", "frn_options", "get_norm", "install", "uninstall", "is_installed"]

NORM_NAME = "FRN"
# The names of detectron2's get_norm dict (tests check each is still accepted by the stock function).
STOCK_NORM_NAMES = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")
LEARNED_EPS_MODES = ("auto", "all", "none")
ACTIVATIONS = ("TLU", "RELU")


@dataclasses.dataclass(frozen=True)
class FRNOptions:
    """MODEL.FRN as used while building; see :func:`frn_det.add_frn_config` for the meaning."""

    eps: float = 1e-6
    learned_eps: str = "auto"
    activation: str = "TLU"
    impl: str = "auto"

    def __post_init__(self):
        for field, value, valid in (("LEARNED_EPS", self.learned_eps, LEARNED_EPS_MODES),
                                    ("ACTIVATION", self.activation, ACTIVATIONS), ("IMPL", self.impl, IMPLS)):
            if value not in valid:
                raise ValueError(f"MODEL.FRN.{field} must be one of {valid}, got {value!r}")
        if not self.eps >= 0:
            raise ValueError(f"MODEL.FRN.EPS must be >= 0, got {self.eps}")

    @classmethod
    def from_cfg(cls, cfg) -> Optional["FRNOptions"]:
        """The options in ``cfg.MODEL.FRN``; None when the cfg has no such node."""
        node = getattr(getattr(cfg, "MODEL", None), "FRN", None)
        if node is None:
            return None
        return cls(eps=float(node.EPS), learned_eps=node.LEARNED_EPS, activation=node.ACTIVATION, impl=node.IMPL)


_OPTIONS = contextvars.ContextVar("frn_det_options", default=FRNOptions())
# True while a module whose planes can be 1x1 is being built (LEARNED_EPS "auto").
_SMALL_PLANES = contextvars.ContextVar("frn_det_small_planes", default=False)
# The FRN layers get_norm("FRN") returned during the innermost wrapped constructor.
_BUILT = contextvars.ContextVar("frn_det_built", default=None)


@contextlib.contextmanager
def frn_options(cfg=None, **overrides):
    """Build FRN layers with ``cfg.MODEL.FRN`` (plus ``overrides``: eps, learned_eps, activation, impl).

    ``build_model(cfg)`` and ``build_backbone(cfg)`` enter this context themselves; use it when
    building parts (a head, a ResNet) by hand. A cfg without MODEL.FRN keeps the current options
    (the defaults unless an outer ``frn_options`` set them).
    """
    options = (FRNOptions.from_cfg(cfg) if cfg is not None else None) or _OPTIONS.get()
    token = _OPTIONS.set(dataclasses.replace(options, **overrides))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)


class UnknownNormError(KeyError):
    def __str__(self):  # KeyError would print the message quoted
        return str(self.args[0])


_STOCK_GET_NORM = batch_norm.get_norm


def get_norm(norm, out_channels):
    """detectron2's ``get_norm`` plus the name "FRN" (FRN without TLU, options from the context)."""
    if isinstance(norm, str) and norm == NORM_NAME:
        return _new_frn(out_channels)
    try:
        return _STOCK_GET_NORM(norm, out_channels)
    except KeyError:
        if not isinstance(norm, str):
            raise
        names = ", ".join(STOCK_NORM_NAMES + (NORM_NAME,))
        raise UnknownNormError(f"Unknown norm {norm!r}; valid names: {names} (or '' for none)") from None


def _new_frn(channels):
    options = _OPTIONS.get()
    learned = options.learned_eps == "all" or (options.learned_eps == "auto" and _SMALL_PLANES.get())
    impl = None if options.impl == "auto" else options.impl  # None: the layer reads FRN_DET_IMPL, else auto
    module = FilterResponseNorm2d(channels, eps=options.eps, learned_eps=learned, tlu=False, impl=impl)
    built = _BUILT.get()
    if built is not None:
        built.append(module)
    return module


def _with_tlu(frn: FilterResponseNorm2d) -> FilterResponseNorm2d:
    # Deterministic init (ones / zeros / constants): replacing the module draws no random numbers.
    return FilterResponseNorm2d(frn.num_features, eps=frn.eps, learned_eps=frn.eps_l is not None, tlu=True,
                                impl=frn.impl)


# ---- TLU placement: the blocks' FRN forwards (no ReLU after a TLU) ----

class FRNBasicStem(BasicStem):
    """BasicStem whose conv1 norm is FRN+TLU: no ReLU before the max-pool."""

    def forward(self, x):
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


class FRNBasicBlock(BasicBlock):
    """BasicBlock with FRN+TLU on conv1, FRN on conv2 / shortcut and a TLU after the add."""

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return self.tlu(out + (x if self.shortcut is None else self.shortcut(x)))


class FRNBottleneckBlock(BottleneckBlock):
    """BottleneckBlock with FRN+TLU on conv1 / conv2, FRN on conv3 / shortcut and a TLU after the add."""

    def forward(self, x):
        out = self.conv3(self.conv2(self.conv1(x)))
        return self.tlu(out + (x if self.shortcut is None else self.shortcut(x)))


def _place_stem(stem, built):
    stem.conv1.norm = _with_tlu(stem.conv1.norm)
    stem.__class__ = FRNBasicStem


def _place_residual(frn_class, tlu_convs):
    def place(block, built):
        for name in tlu_convs:
            conv = getattr(block, name)
            conv.norm = _with_tlu(conv.norm)
        block.tlu = TLU(block.out_channels)
        block.__class__ = frn_class
    return place


def _place_retinanet_head(head, built):
    for subnet in (head.cls_subnet, head.bbox_subnet):
        for i in range(len(subnet) - 1):
            if any(subnet[i] is m for m in built) and isinstance(subnet[i + 1], nn.ReLU):
                subnet[i] = _with_tlu(subnet[i])
                subnet[i + 1] = nn.Identity()  # not deleted: keeps the stock indices of the convs


def _place_conv_head(head, built):
    for conv in head.conv_norm_relus:
        if any(conv.norm is m for m in built):
            conv.norm = _with_tlu(conv.norm)
            conv.activation = None


# class -> (placement applied after its stock __init__ in "TLU" mode, planes can be 1x1)
_PLACEMENTS = {
    BasicStem: (_place_stem, False),
    BasicBlock: (_place_residual(FRNBasicBlock, ("conv1",)), False),
    BottleneckBlock: (_place_residual(FRNBottleneckBlock, ("conv1", "conv2")), False),
    RetinaNetHead: (_place_retinanet_head, True),
    FastRCNNConvFCHead: (_place_conv_head, False),
    MaskRCNNConvUpsampleHead: (_place_conv_head, False),
}


def _wrap_init(cls, place, small_planes):
    stock_init = cls.__init__

    @functools.wraps(stock_init)
    def __init__(self, *args, **kwargs):
        built = []
        tokens = (_BUILT.set(built), _SMALL_PLANES.set(small_planes or _SMALL_PLANES.get()))
        try:
            stock_init(self, *args, **kwargs)
        finally:
            _SMALL_PLANES.reset(tokens[1])
            _BUILT.reset(tokens[0])
        # Only the exact stock class: a subclass may have its own forward that applies ReLUs.
        if built and type(self) is cls and _OPTIONS.get().activation == "TLU":
            place(self, built)

    __init__.__frn_det_stock__ = stock_init
    return __init__


def _report_bn_checkpoint(model, incompatible_keys):
    """Load-state-dict post-hook: say in one line what loading BatchNorm entries into FRN layers did."""
    frns = [n for n, m in model.named_modules() if isinstance(m, FilterResponseNorm2d)]
    from_bn = [n for n in frns if f"{n}.running_mean" in incompatible_keys.unexpected_keys]
    if from_bn:
        logging.getLogger(__name__).warning(
            f"{len(from_bn)} of {len(frns)} FRN layers were loaded from BatchNorm entries (e.g. {from_bn[0]}): "
            "BN weight/bias became FRN gamma/beta, running statistics were ignored, TLU tau and eps_l keep "
            "their initial values.")


def _cfg_scoped(builder):
    """Run a stock builder ``builder(cfg, ...)`` inside ``frn_options(cfg)``."""

    @functools.wraps(builder)
    def build(cfg, *args, **kwargs):
        with frn_options(cfg):
            module = builder(cfg, *args, **kwargs)
        if any(isinstance(m, FilterResponseNorm2d) for m in module.modules()):
            module.register_load_state_dict_post_hook(_report_bn_checkpoint)
        return module

    return build


_STOCK_BUILD_MODEL = meta_arch_build.build_model
_STOCK_BUILD_BACKBONE = backbone_build.build_backbone
# (stock function, replacement): rebound under the same name in every loaded detectron2 module.
_FUNCTIONS = (
    (_STOCK_GET_NORM, get_norm),
    (_STOCK_BUILD_MODEL, _cfg_scoped(_STOCK_BUILD_MODEL)),
    (_STOCK_BUILD_BACKBONE, _cfg_scoped(_STOCK_BUILD_BACKBONE)),
)


def _rebind(old, new):
    # Every loaded module, not only detectron2's: scripts and plugins commonly import build_model or
    # get_norm from detectron2 before importing frn_det (isort puts detectron2 first).
    for name, module in list(sys.modules.items()):
        if name != __name__ and getattr(module, "__dict__", {}).get(old.__name__) is old:
            setattr(module, old.__name__, new)


def is_installed() -> bool:
    return getattr(BottleneckBlock.__init__, "__frn_det_stock__", None) is not None


def install():
    """Patch detectron2 so the norm name "FRN" works (idempotent)."""
    if is_installed():
        return
    for stock, ours in _FUNCTIONS:
        _rebind(stock, ours)
    for cls, (place, small_planes) in _PLACEMENTS.items():
        cls.__init__ = _wrap_init(cls, place, small_planes)


def uninstall():
    """Restore detectron2's own functions and constructors (idempotent). Built models are unaffected."""
    if not is_installed():
        return
    for stock, ours in _FUNCTIONS:
        _rebind(ours, stock)
    for cls in _PLACEMENTS:
        cls.__init__ = cls.__init__.__frn_det_stock__


install()

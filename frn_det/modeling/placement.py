"""The paper's FRN placement as a post-build transform over a detectron2 model.

``get_norm("FRN", C)`` (frn_det.modeling.norm_adapter) returns a plain FRN without TLU: a drop-in
norm followed by whatever activation its consumer applies. :func:`apply_frn_placement` then turns a
built model into the paper's layout, in place, on the model's device and dtype:

=========================== ==================================================================
BasicStem                   conv1: FRN+TLU, no ReLU before the max-pool
BottleneckBlock (R50/R101)  conv1, conv2: FRN+TLU; conv3, shortcut: FRN; ``tlu``: TLU after the add
BasicBlock (R18/R34)        conv1: FRN+TLU; conv2, shortcut: FRN; ``tlu``: TLU after the add
RetinaNetHead               subnet norms: FRN+TLU; the nn.ReLU after each becomes nn.Identity
FastRCNNConvFCHead          conv norms: FRN+TLU; the Conv2d's ``activation`` (ReLU) removed
MaskRCNNConvUpsampleHead    same as the box head
FPN and other consumers     FRN (nothing follows it in FPN)
=========================== ==================================================================

Only instances of exactly these classes whose norms are FRN change (subclasses may have their own
forward that applies ReLUs; DeformBottleneckBlock, RegNet, ... keep FRN as a drop-in norm, as in
"RELU" mode). Residual blocks and the stem change class to the ``FRN*`` subclasses below, whose
forward drops the ReLUs. With LEARNED_EPS "auto", the FRN layers of modules whose planes can be
1x1 (:data:`SMALL_PLANE_MODULES`) learn eps_l; with "all", every FRN layer does.

The transform draws no random numbers (TLU and eps_l have constant inits) and is idempotent.
Checkpoint keys: ``<conv>.norm.{weight,bias}`` every FRN; ``<conv>.norm.tau`` FRN+TLU;
``<conv>.norm.eps_l`` learned eps; ``backbone.bottom_up.res<k>.<i>.tlu.tau`` post-add TLU.
nn.Identity keeps the RetinaNet subnets' indices, so BN/GN checkpoints' conv keys stay valid.
"""
import torch.nn.functional as F
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from torch import nn

from ..layers import TLU, FilterResponseNorm2d
from .config import FRNOptions

__all__ = ["apply_frn_placement", "with_frn_placement", "FRNBasicStem", "FRNBasicBlock", "FRNBottleneckBlock", "PLACEMENTS",
           "SMALL_PLANE_MODULES"]


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


def _is_frn(module):
    return isinstance(module, FilterResponseNorm2d)


def _place_stem(stem):
    if _is_frn(stem.conv1.norm):
        stem.conv1.norm.add_tlu()
        stem.__class__ = FRNBasicStem


def _place_residual(frn_class, tlu_convs):
    def place(block):
        if not all(_is_frn(getattr(block, name).norm) for name in tlu_convs):
            return
        for name in tlu_convs:
            getattr(block, name).norm.add_tlu()
        weight = block.conv1.weight  # a frozen block (FREEZE_AT) gets a frozen TLU
        block.tlu = TLU(block.out_channels, device=weight.device, dtype=weight.dtype).requires_grad_(weight.requires_grad)
        block.__class__ = frn_class
    return place


def _place_retinanet_head(head):
    for subnet in (head.cls_subnet, head.bbox_subnet):
        for i in range(len(subnet) - 1):
            if _is_frn(subnet[i]) and isinstance(subnet[i + 1], nn.ReLU):
                subnet[i].add_tlu()
                subnet[i + 1] = nn.Identity()  # not deleted: keeps the stock indices of the convs


def _place_conv_head(head):
    for conv in head.conv_norm_relus:
        if _is_frn(conv.norm) and isinstance(conv.activation, nn.ReLU):
            conv.norm.add_tlu()
            conv.activation = None


# stock class -> its TLU placement (applied to instances of exactly that class)
PLACEMENTS = {
    BasicStem: _place_stem,
    BasicBlock: _place_residual(FRNBasicBlock, ("conv1",)),
    BottleneckBlock: _place_residual(FRNBottleneckBlock, ("conv1", "conv2")),
    RetinaNetHead: _place_retinanet_head,
    FastRCNNConvFCHead: _place_conv_head,
    MaskRCNNConvUpsampleHead: _place_conv_head,
}
# Modules whose FRN layers see planes that can be 1x1: the RetinaNet head is shared by P3-P7, and
# P7 (stride 128) is 1x1 on images up to 128 px.
SMALL_PLANE_MODULES = (RetinaNetHead,)


def apply_frn_placement(model: nn.Module, options=None) -> nn.Module:
    """Apply the paper's TLU placement and the learned-eps policy to a built model, in place.

    Args:
        model: any module (a detectron2 model, backbone or head built with norm "FRN").
        options: an :class:`FRNOptions`, a config with MODEL.FRN, or None for the defaults.
            ``activation`` "TLU" places TLUs as in the table above ("RELU" leaves detectron2's
            ReLUs); ``learned_eps`` "auto" / "all" / "none" picks the FRN layers that learn eps_l.

    Returns ``model``. ``build_model`` / ``build_backbone`` call it themselves with the cfg's
    MODEL.FRN; call it for models built by hand or from a LazyConfig.
    """
    if options is None:
        options = FRNOptions()
    elif not isinstance(options, FRNOptions):
        options = FRNOptions.from_cfg(options) or FRNOptions()
    modules = list(model.modules())  # placement adds modules: iterate over a snapshot
    if options.activation == "TLU":
        for module in modules:
            place = PLACEMENTS.get(type(module))
            if place is not None:
                place(module)
    if options.learned_eps == "all":
        learning = [model]
    elif options.learned_eps == "auto":
        learning = [m for m in modules if isinstance(m, SMALL_PLANE_MODULES)]
    else:
        learning = []
    for scope in learning:
        for m in scope.modules():
            if _is_frn(m):
                m.add_learned_eps()
    return model


def with_frn_placement(model: nn.Module, learned_eps: str = "auto", activation: str = "TLU") -> nn.Module:
    """:func:`apply_frn_placement` with the options as arguments, for LazyConfigs: wrapping a model's
    ``LazyCall`` in ``L(with_frn_placement)(model=...)`` makes ``instantiate`` return the placed model
    (configs/lazy). FRN eps and implementation come from :func:`frn_det.frn_options` while instantiating."""
    return apply_frn_placement(model, FRNOptions(learned_eps=learned_eps, activation=activation))

"""Zero-initialised residual branches for any norm (MODEL.RESNETS.ZERO_INIT_RESIDUAL)."""
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, DeformBottleneckBlock
from torch import nn

# residual block class (and its subclasses, the FRN* blocks included) -> its branch's last conv
LAST_CONV = {BasicBlock: "conv2", BottleneckBlock: "conv3", DeformBottleneckBlock: "conv3"}


def zero_init_residual_norms(model: nn.Module) -> int:
    """Set to zero the scale (gamma) of the last norm in every trainable residual branch of ``model``,
    so each block starts as its shortcut; returns how many. Blocks frozen by MODEL.BACKBONE.FREEZE_AT
    (FrozenBN, or parameters without gradients) keep theirs: they come from a checkpoint.
    ``build_model`` / ``build_backbone`` call it when MODEL.RESNETS.ZERO_INIT_RESIDUAL is set; call it
    for models built by hand or from a LazyConfig.

    Raises ValueError when a branch has no norm with a learned scale, or every branch is frozen."""
    count, frozen = 0, 0
    for name, block in model.named_modules():
        conv_name = next((c for cls, c in LAST_CONV.items() if isinstance(block, cls)), None)
        if conv_name is None:
            continue
        norm = getattr(getattr(block, conv_name), "norm", None)
        if isinstance(norm, FrozenBatchNorm2d) or (isinstance(getattr(norm, "weight", None), nn.Parameter)
                                                   and not norm.weight.requires_grad):
            frozen += 1
            continue
        if not isinstance(getattr(norm, "weight", None), nn.Parameter):
            raise ValueError(f"MODEL.RESNETS.ZERO_INIT_RESIDUAL needs a norm with a learned scale, but "
                             f"{name}.{conv_name}.norm is {type(norm).__name__ if norm is not None else 'absent'}")
        nn.init.zeros_(norm.weight)
        count += 1
    if frozen and not count:
        raise ValueError(f"MODEL.RESNETS.ZERO_INIT_RESIDUAL: all {frozen} residual branches are frozen (FrozenBN or "
                         "MODEL.BACKBONE.FREEZE_AT), none was zero-initialised")
    return count

"""The detectron2 side of FRN: MODEL.FRN, the norm name "FRN" (the adapter), the paper's placement
as a post-build transform, and the optimizer that counts FRN/TLU parameters as norm parameters.

Importing it installs the adapter (idempotent; ``uninstall()`` reverses it).
"""
from .._requires import require_detectron2

require_detectron2("frn_det.modeling")

from .config import FRNOptions, add_frn_config  # noqa: E402
from .norm_adapter import current_options, frn_options, get_norm, install, is_installed, uninstall  # noqa: E402
from .optimizer import build_optimizer, get_optimizer_params, optimizer_params  # noqa: E402
from .placement import (  # noqa: E402
    FRNBasicBlock,
    FRNBasicStem,
    FRNBottleneckBlock,
    apply_frn_placement,
    with_frn_placement,
)
from .residual_init import zero_init_residual_norms  # noqa: E402

install()

__all__ = [
    "FRNOptions", "add_frn_config", "apply_frn_placement", "build_optimizer", "current_options", "frn_options",
    "get_norm", "get_optimizer_params", "install", "is_installed", "optimizer_params", "uninstall", "with_frn_placement",
    "zero_init_residual_norms",
    "FRNBasicBlock", "FRNBasicStem", "FRNBottleneckBlock",
]

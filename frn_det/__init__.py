"""frn-det: Filter Response Normalization (FRN + TLU) for detectron2.

``frn_det.layers`` (the layers, the functional forms, the fused op) needs torch alone. When
detectron2 is installed, importing the package also registers what it adds to detectron2: the norm
name "FRN" (``frn_det.modeling``) and the synthetic datasets (``frn_det.data``). Without detectron2,
the detectron2 parts raise an ImportError that says how to install it.
"""
from ._requires import detectron2_missing
from .layers import TLU, FilterResponseNorm2d, frn, frn_reference

_DETECTRON2_NAMES = ("add_frn_config", "apply_frn_placement", "build_optimizer", "frn_options", "FRNOptions")

try:
    import detectron2  # noqa: F401
except ImportError:
    HAS_DETECTRON2 = False
else:
    HAS_DETECTRON2 = True
    from . import data  # noqa: F401  (imported for registration: frn_synthetic_train / frn_synthetic_val)
    from .modeling import FRNOptions, add_frn_config, apply_frn_placement, build_optimizer, frn_options  # registers "FRN"


def __getattr__(name):
    if name in _DETECTRON2_NAMES and not HAS_DETECTRON2:
        raise detectron2_missing(f"frn_det.{name}")
    raise AttributeError(f"module 'frn_det' has no attribute {name!r}")


__all__ = ["FilterResponseNorm2d", "TLU", "frn", "frn_reference", *_DETECTRON2_NAMES]

"""frn-det: Filter Response Normalization (FRN + TLU) for detectron2.

Importing the package registers everything it adds to detectron2: the norm name "FRN" and the
synthetic datasets.
"""
try:
    import detectron2  # noqa: F401
except ImportError as e:
    raise ImportError(
        "frn_det needs detectron2, which is not installed in this environment. detectron2 has no "
        "package on PyPI under that name: run `make test` (installs it into .venv by the verified "
        "recipe in README.md), or install upstream detectron2 from its git repository "
        "(pip install 'git+https://github.com/facebookresearch/detectron2.git')."
    ) from e

from .layers import TLU, FilterResponseNorm2d, frn, frn_reference
from . import d2_norm_adapter  # noqa: F401  (imported for registration: the norm name "FRN" in detectron2)
from .config import add_frn_config
from .optimizer import build_optimizer
from . import data  # noqa: F401  (registers frn_synthetic_train / frn_synthetic_val)

__all__ = ["FilterResponseNorm2d", "TLU", "frn", "frn_reference", "add_frn_config", "build_optimizer"]

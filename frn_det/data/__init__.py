"""Datasets: the synthetic COCO-format dataset and user COCO datasets from the command line."""
from .._requires import require_detectron2

require_detectron2("frn_det.data")

from .register import (  # noqa: E402
    check_registered,
    default_synthetic_root,
    ensure_synthetic,
    register_coco_dataset,
    register_synthetic,
    uses_rle_masks,
)
from .synthetic import CLASSES, SyntheticSpec, generate  # noqa: E402

register_synthetic()

__all__ = [
    "CLASSES",
    "SyntheticSpec",
    "check_registered",
    "default_synthetic_root",
    "ensure_synthetic",
    "generate",
    "register_coco_dataset",
    "register_synthetic",
    "uses_rle_masks",
]

"""Datasets: the synthetic COCO-format dataset and user COCO datasets from the command line."""
from .register import (
    check_registered,
    default_synthetic_root,
    ensure_synthetic,
    register_coco_dataset,
    register_synthetic,
    uses_rle_masks,
)
from .synthetic import CLASSES, SyntheticSpec, generate

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

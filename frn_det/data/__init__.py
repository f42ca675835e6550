"""Datasets: the synthetic COCO-format dataset, the shipped BCCD (Pascal VOC), and user COCO and Pascal VOC
datasets from the command line."""
from .._requires import require_detectron2

require_detectron2("frn_det.data")

from .register import (  # noqa: E402
    BCCD_CLASSES,
    check_registered,
    default_bccd_root,
    default_synthetic_root,
    ensure_synthetic,
    register_bccd,
    register_coco_dataset,
    register_synthetic,
    uses_rle_masks,
)
from .synthetic import CLASSES, SyntheticSpec, generate  # noqa: E402
from .voc import ensure_coco_json, register_voc_dataset, voc_class_names  # noqa: E402

register_synthetic()
register_bccd()

__all__ = [
    "BCCD_CLASSES",
    "CLASSES",
    "SyntheticSpec",
    "check_registered",
    "default_bccd_root",
    "default_synthetic_root",
    "ensure_coco_json",
    "ensure_synthetic",
    "generate",
    "register_bccd",
    "register_coco_dataset",
    "register_synthetic",
    "register_voc_dataset",
    "uses_rle_masks",
    "voc_class_names",
]

"""Dataset registration: the synthetic dataset and the shipped BCCD copy under stable names, and user
COCO-format datasets (user Pascal VOC folders: :mod:`frn_det.data.voc`).

Compared with detectron2's ``register_coco_instances``, the loader registered here names the file
when the json is malformed, lists missing image files before training starts instead of failing in
a data-loader worker, and ``uses_rle_masks`` tells whether a dataset needs
``INPUT.MASK_FORMAT: bitmask``.
"""
import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from . import synthetic, voc
from .coco_checks import check_annotations

logger = logging.getLogger(__name__)

# The registered synthetic datasets: name prefix -> (spec, folder beside the default root's). The
# cluttered one has the same objects on a cluttered background (frn_det/data/synthetic.py).
SYNTHETIC_DATASETS = {"frn_synthetic": (synthetic.SyntheticSpec(), ""),
                      "frn_synthetic_clutter": (synthetic.CLUTTERED_SPEC, "_clutter")}
SYNTHETIC_NAMES = {f"{prefix}_{split}": split for prefix in SYNTHETIC_DATASETS for split in synthetic.SPLITS}


def default_synthetic_root():
    """``$FRN_DET_DATA``, else ``$DETECTRON2_DATASETS/frn_synthetic`` (detectron2's "datasets")."""
    if os.environ.get("FRN_DET_DATA"):
        return os.environ["FRN_DET_DATA"]
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "frn_synthetic")


def load_coco_dataset(json_file, image_root, name):
    """detectron2's ``load_coco_json`` with errors that name the file at fault."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"dataset '{name}': annotation file {json_file} does not exist")
    try:
        with open(json_file) as f:
            check_annotations(json.load(f), json_file, name)
        dicts = load_coco_json(json_file, image_root, name)
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset '{name}': {json_file} is not valid JSON: {e}") from e
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        # pycocotools and load_coco_json index the json without checks: any of these means the
        # file is JSON but not a COCO instances file.
        raise ValueError(
            f"dataset '{name}': {json_file} is not a COCO instances file "
            f"(needs 'images', 'annotations', 'categories' lists): {type(e).__name__}: {e}"
        ) from e
    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"dataset '{name}': {len(missing)} of {len(dicts)} images listed in {json_file} are "
            f"missing under {image_root}:\n  {shown}{more}"
        )
    return dicts


def register_coco_dataset(name, json_file, image_root):
    """Registers a COCO-format instances dataset (polygon or RLE masks) under ``name``."""
    if name in DatasetCatalog.list():
        raise ValueError(f"dataset name '{name}' is already registered; pick another name")
    DatasetCatalog.register(name, lambda: load_coco_dataset(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


# BCCD (datasets/BCCD/SOURCE.md): a real Pascal VOC dataset shipped in the checkout.
BCCD_CLASSES = ("Platelets", "RBC", "WBC")  # its xml files' names, sorted (voc_class_names)
BCCD_SPLITS = ("train", "val", "test", "trainval")
BCCD_IN_CHECKOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "datasets", "BCCD")


def default_bccd_root():
    """``$FRN_DET_BCCD``, else ``$DETECTRON2_DATASETS/BCCD`` (detectron2's "datasets") where it exists,
    else the checkout's copy (datasets/BCCD beside the frn_det package of an editable install)."""
    if os.environ.get("FRN_DET_BCCD"):
        return os.environ["FRN_DET_BCCD"]
    under_d2 = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "BCCD")
    return under_d2 if os.path.isdir(under_d2) or not os.path.isdir(BCCD_IN_CHECKOUT) else BCCD_IN_CHECKOUT


def register_bccd(root=None):
    """(Re-)registers ``bccd_{train,val,test,trainval}`` at ``root`` (default above)."""
    root = root or default_bccd_root()
    for split in BCCD_SPLITS:
        name = f"bccd_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        voc._register(name, root, split, BCCD_CLASSES, hint=(
            " (BCCD ships in the frn-det checkout as datasets/BCCD; FRN_DET_BCCD or DETECTRON2_DATASETS/BCCD "
            "name another copy)"))


def _synthetic_loader(name, root):
    split = SYNTHETIC_NAMES[name]
    json_file = synthetic.annotation_path(root, split)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"dataset '{name}': {json_file} does not exist. Generate the synthetic dataset with\n"
            f"  python tools/make_synthetic_coco.py --root {root}\n"
            "(tools/train_net.py does this by itself with the default settings)."
        )
    return load_coco_dataset(json_file, synthetic.image_dir(root, split), name)


def register_synthetic(root=None):
    """(Re-)registers ``frn_synthetic_{train,val}`` at ``root`` (default above) and the cluttered
    ``frn_synthetic_clutter_{train,val}`` at ``root`` + "_clutter".

    Nothing is read here: the data may be generated after registration.
    """
    root = root or default_synthetic_root()
    for prefix, (_, suffix) in SYNTHETIC_DATASETS.items():
        _register_synthetic(prefix, root + suffix)


def _register_synthetic(prefix, root):
    for split in synthetic.SPLITS:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda name=name: _synthetic_loader(name, root))
        MetadataCatalog.get(name).set(
            json_file=synthetic.annotation_path(root, split),
            image_root=synthetic.image_dir(root, split),
            evaluator_type="coco",
            thing_classes=list(synthetic.CLASSES),
            synthetic_root=root,
        )


def ensure_synthetic(names, progress=True):
    """Generates a registered synthetic dataset (its spec in SYNTHETIC_DATASETS) if one of ``names`` is
    one of its splits and its root does not hold it (missing, or generated with other settings or an
    older generator). Call it on one process only (detectron2's main process); datasets generated
    with other settings belong under another root ($FRN_DET_DATA)."""
    wanted = {(MetadataCatalog.get(n).synthetic_root, n.rsplit("_", 1)[0]) for n in names if n in SYNTHETIC_NAMES}
    for root, prefix in sorted(wanted):
        spec = SYNTHETIC_DATASETS[prefix][0]
        if not synthetic.is_generated(root, spec):
            logger.info(f"Generating the synthetic dataset under {root} (first use, or its settings changed)")
            synthetic.generate(spec, root, progress=progress)


def check_registered(names, key):
    """Raises a ValueError listing the registered datasets if one of ``names`` is unknown."""
    known = DatasetCatalog.list()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown dataset name(s) {unknown} in {key}. Registered datasets: {sorted(known)}. "
            "Register a COCO-format dataset with --dataset NAME JSON IMAGE_ROOT, a Pascal VOC folder with "
            "--voc-dataset NAME DIR SPLIT."
        )


def uses_rle_masks(name):
    """Whether a registered COCO dataset has RLE masks on non-crowd instances, which detectron2
    loads only with INPUT.MASK_FORMAT bitmask. Reads the dataset's json file."""
    json_file = MetadataCatalog.get(name).get("json_file")
    if json_file is None or not os.path.isfile(json_file):
        return False  # not a COCO json dataset, or missing: its loader reports that
    try:
        with open(json_file) as f:
            anns = json.load(f).get("annotations", [])
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"dataset '{name}': {json_file} is not a valid COCO json: {e}") from e
    return any(isinstance(a.get("segmentation"), dict) and not a.get("iscrowd", 0) for a in anns)

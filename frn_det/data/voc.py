"""Pascal VOC folders (``Annotations/``, ``ImageSets/Main/``, ``JPEGImages/``) as datasets, evaluated
with COCO AP through detectron2's COCOEvaluator like every other dataset here.

The dataset dicts are detectron2's ``load_voc_instances``'s (``file_name`` JPEGImages/<id>.jpg, the
id as ``image_id``, VOC's 1-based inclusive pixels as continuous XYXY_ABS: 1 subtracted from xmin
and ymin; tests/test_voc.py holds them equal), read in one pass that checks what it reads and names
the xml file of each problem before training starts, where detectron2 raises a bare error or trains
on. Decisions (docs/training.md, "Pascal VOC folders"):

- classes: given, or every object name in the folder's ``Annotations/*.xml`` (all splits), sorted,
  so that every split of a folder has the same classes in the same order;
- a single-pixel box (xmin == xmax or ymin == ymax: one pixel wide under VOC's inclusive rule) is
  kept, as 1 px, with a warning naming its files; an inverted box is an error; a box that leaves the
  image is clipped to it with a warning, and one wholly outside is an error;
- ``difficult`` objects become COCO crowd regions (``iscrowd`` 1): COCO evaluation ignores them as
  VOC's own evaluation does (a detection on one counts neither way), and detectron2's dataset
  mappers leave crowd boxes out of the training targets;
- the COCO ground truth COCOEvaluator reads (``metadata.json_file``) is written by
  :func:`ensure_coco_json` under a name that fingerprints the loader's version, the folder, split,
  classes and each listed xml file's size and modification time: a changed input or loader gets a new
  file, never a stale conversion (detectron2's own cache in the output folder is reused whatever changed).
"""
import glob
import hashlib
import json
import logging
import math
import os
import xml.etree.ElementTree as ET

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict
from detectron2.structures import BoxMode

from ..atomic import atomic_write
from .validation import DataError

logger = logging.getLogger(__name__)

# Bump when what the loader produces changes (a decision above): cached ground truth follows it.
LOADER_VERSION = 1
MAX_LISTED = 5


def split_file(dirname, split):
    return os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")


def cache_dir():
    """Where converted ground truth lives: ``$FRN_DET_CACHE/voc_coco``, default ~/.cache/frn_det/voc_coco."""
    return os.path.join(os.environ.get("FRN_DET_CACHE") or os.path.expanduser("~/.cache/frn_det"), "voc_coco")


def _listed(items):
    shown = "\n  ".join(items[:MAX_LISTED])
    return f"\n  {shown}" + (f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _check_folder(dirname, name, hint=""):
    if not os.path.isdir(dirname):
        raise DataError(f"dataset '{name}': Pascal VOC folder {dirname} does not exist{hint}")
    missing = [d for d in ("Annotations", os.path.join("ImageSets", "Main"), "JPEGImages")
               if not os.path.isdir(os.path.join(dirname, d))]
    if missing:
        raise DataError(f"dataset '{name}': {dirname} is not a Pascal VOC folder: it lacks {', '.join(missing)}")


def read_split(dirname, split, name, hint=""):
    """The image ids of ``ImageSets/Main/<split>.txt`` (first column), in file order; ``hint`` ends
    the error of a missing folder (where a built-in dataset is looked for)."""
    _check_folder(dirname, name, hint)
    path = split_file(dirname, split)
    if not os.path.isfile(path):
        found = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(split_file(dirname, "*")))
        raise DataError(f"dataset '{name}': split file {path} does not exist (splits there: {found})")
    with open(path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise DataError(f"dataset '{name}': split file {path} lists no image ids (an empty split)")
    seen, repeated = set(), []
    for i in ids:
        if i in seen:
            repeated.append(i)
        seen.add(i)
    if repeated:
        raise DataError(f"dataset '{name}': split file {path} lists image ids more than once: {sorted(set(repeated))[:10]}")
    return ids


def _parse(xml_file, name):
    try:
        return ET.parse(xml_file).getroot()
    except FileNotFoundError:
        raise DataError(f"dataset '{name}': annotation file {xml_file} does not exist") from None
    except ET.ParseError as e:
        raise DataError(f"dataset '{name}': annotation file {xml_file} is not valid XML: {e}") from None


def voc_class_names(dirname, name="?"):
    """Every object name in ``dirname``'s Annotations/*.xml (all splits), sorted."""
    _check_folder(dirname, name)
    names = set()
    for xml_file in sorted(glob.glob(os.path.join(dirname, "Annotations", "*.xml"))):
        names.update(obj.findtext("name") for obj in _parse(xml_file, name).iter("object"))
    names.discard(None)
    if not names:
        raise DataError(f"dataset '{name}': no object names in {os.path.join(dirname, 'Annotations')}/*.xml")
    return sorted(names)


class _Problems:
    """What the loader found, by kind: errors stop it (every file of every kind listed), warnings do not."""

    def __init__(self, name):
        self.name, self.errors, self.warnings = name, {}, {}

    def error(self, kind, where):
        self.errors.setdefault(kind, []).append(where)

    def warn(self, kind, where):
        self.warnings.setdefault(kind, []).append(where)

    def raise_or_warn(self, split_path):
        for kind, where in self.warnings.items():
            logger.warning(f"dataset '{self.name}': {len(where)} {kind}:{_listed(where)}")
        if self.errors:
            parts = [f"{len(where)} {kind}:{_listed(where)}" for kind, where in self.errors.items()]
            raise DataError(f"dataset '{self.name}' ({split_path}):\n" + "\n".join(parts))


def _number(text):
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _image_size(root, xml_file, problems):
    w, h = _number(root.findtext("size/width")), _number(root.findtext("size/height"))
    if not (w and h and w > 0 and h > 0 and w == int(w) and h == int(h)):
        problems.error("annotation files without a positive integer size/width and size/height", xml_file)
        return None
    return int(w), int(h)


def _instance(obj, index, xml_file, size, class_names, problems):
    """The dataset dict annotation of one <object>, or None when it has a problem (recorded)."""
    where = f"{xml_file}: object {index}"
    cls = obj.findtext("name")
    if cls not in class_names:
        problems.error(f"objects with a class name outside the dataset's classes {list(class_names)}",
                       f"{where}: name {cls!r}")
        return None
    box = [_number(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
    if None in box:
        problems.error("objects without four finite numbers as bndbox xmin/ymin/xmax/ymax", f"{where}: {box}")
        return None
    xmin, ymin, xmax, ymax = box
    if xmax < xmin or ymax < ymin:
        problems.error("inverted boxes (xmax < xmin or ymax < ymin)", f"{where}: {box}")
        return None
    if xmax == xmin or ymax == ymin:
        problems.warn("single-pixel boxes (xmin == xmax or ymin == ymax), kept as 1 px", f"{where}: {box}")
    # VOC: 1-based pixel indices, inclusive; detectron2: continuous coordinates (load_voc_instances' rule)
    x0, y0, x1, y1 = xmin - 1.0, ymin - 1.0, xmax, ymax
    w, h = size
    clipped = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]
    if clipped != [x0, y0, x1, y1]:
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            problems.error("boxes wholly outside their image", f"{where}: {box} in {w}x{h}")
            return None
        problems.warn("boxes that leave their image, clipped to it", f"{where}: {box} in {w}x{h}")
    difficult = (obj.findtext("difficult") or "0").strip()
    if difficult not in ("0", "1"):
        problems.error("objects whose difficult flag is not 0 or 1", f"{where}: difficult {difficult!r}")
        return None
    return {"category_id": class_names.index(cls), "bbox": clipped, "bbox_mode": BoxMode.XYXY_ABS,
            "iscrowd": int(difficult)}


def load_voc_dataset(dirname, split, class_names, name, hint=""):
    """The checked dataset dicts of one split (module docstring); a DataError names every bad file."""
    class_names = list(class_names)
    ids = read_split(dirname, split, name, hint)
    problems = _Problems(name)
    dicts = []
    for fileid in ids:
        xml_file = os.path.join(dirname, "Annotations", fileid + ".xml")
        jpeg_file = os.path.join(dirname, "JPEGImages", fileid + ".jpg")
        if not os.path.isfile(xml_file):
            problems.error("image ids without an annotation file", xml_file)
            continue
        try:
            root = ET.parse(xml_file).getroot()
        except ET.ParseError as e:
            problems.error("annotation files that are not valid XML", f"{xml_file}: {e}")
            continue
        if not os.path.isfile(jpeg_file):
            problems.error("image ids without their image (JPEGImages/<id>.jpg)", f"{jpeg_file} (for {xml_file})")
            continue
        size = _image_size(root, xml_file, problems)
        if size is None:
            continue
        annotations = [_instance(obj, i, xml_file, size, class_names, problems)
                       for i, obj in enumerate(root.iter("object"))]
        dicts.append({"file_name": jpeg_file, "image_id": fileid, "height": size[1], "width": size[0],
                      "annotations": [a for a in annotations if a is not None]})
    problems.raise_or_warn(split_file(dirname, split))
    return dicts


def _fingerprint(dirname, split, class_names):
    """Changes whenever the loader, its arguments or a listed xml file does (module docstring)."""
    h = hashlib.sha256(json.dumps([LOADER_VERSION, os.path.abspath(dirname), split, list(class_names)]).encode())
    try:
        with open(split_file(dirname, split), "rb") as f:
            listing = f.read()
    except OSError:
        return h.hexdigest()[:16] + "-unreadable"
    h.update(listing)
    for fileid in listing.decode(errors="replace").split():
        try:
            st = os.stat(os.path.join(dirname, "Annotations", fileid + ".xml"))
            h.update(f"{fileid}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{fileid}:-;".encode())
    return h.hexdigest()[:16]


def register_voc_dataset(name, dirname, split, class_names=None):
    """Registers split ``split`` of the Pascal VOC folder ``dirname`` under ``name``, with ``class_names``
    or the folder's own (:func:`voc_class_names`), for COCO evaluation (module docstring)."""
    if name in DatasetCatalog.list():
        raise ValueError(f"dataset name '{name}' is already registered; pick another name")
    _register(name, dirname, split, class_names if class_names is not None else voc_class_names(dirname, name))


def _register(name, dirname, split, class_names, hint=""):
    class_names = list(class_names)
    DatasetCatalog.register(name, lambda: load_voc_dataset(dirname, split, class_names, name, hint))
    json_file = os.path.join(cache_dir(), f"{name}-{_fingerprint(dirname, split, class_names)}.json")
    MetadataCatalog.get(name).set(thing_classes=class_names, dirname=dirname, split=split, evaluator_type="coco",
                                  image_root=os.path.join(dirname, "JPEGImages"), json_file=json_file,
                                  voc_split_file=split_file(dirname, split))


def ensure_coco_json(name):
    """Writes the COCO-format ground truth of VOC dataset ``name`` where its metadata's json_file says,
    unless there already (any other dataset: nothing to do). Call it before COCOEvaluator(name)."""
    meta = MetadataCatalog.get(name)
    if meta.get("voc_split_file") is None or os.path.isfile(meta.json_file):
        return
    coco = convert_to_coco_dict(name)
    os.makedirs(os.path.dirname(meta.json_file), exist_ok=True)
    with atomic_write(meta.json_file) as f:
        json.dump(coco, f)
    logger.info(f"dataset '{name}': COCO-format ground truth written to {meta.json_file}")

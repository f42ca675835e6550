"""Checks of a COCO instances json before detectron2 loads it: the inconsistencies that change what
is trained or scored without an error from detectron2 or pycocotools (docs/training.md, "COCO json
checks", has the table of decisions and why).

Every problem found is in one :class:`AnnotationError` that names the dataset, the json and the
offending images or annotations (the first few of each kind, the rest counted). Cases that can be
legitimate are logged as warnings. One pass over the json: seconds for COCO's 860k annotations.
"""
import logging
import math
from numbers import Real

from .validation import DataError

logger = logging.getLogger(__name__)

SHOWN = 3  # offending items named per kind of problem; the rest are counted


class AnnotationError(DataError):
    """A COCO json whose images, annotations or categories are inconsistent."""


def _finite(v):
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _all_finite(values):
    """Whether a flat list holds finite numbers only: their sum is finite unless one is NaN or
    infinite (or the sum overflows, which no pixel coordinate does); one C loop, not one per value."""
    try:
        return math.isfinite(sum(values))
    except TypeError:  # a string, None or a list among them
        return False


def _repeated(items, key):
    """{value: count} of ``key`` values that occur more than once among ``items``."""
    seen, repeated = set(), {}
    for item in items:
        v = item.get(key)
        if v in seen:
            repeated[v] = repeated.get(v, 1) + 1
        seen.add(v)
    return repeated


class _Findings:
    def __init__(self):
        self.errors, self.warnings = {}, {}

    def add(self, kind, example, warning=False):
        found = (self.warnings if warning else self.errors).setdefault(kind, [0, []])
        found[0] += 1
        if len(found[1]) < SHOWN:
            found[1].append(example)

    @staticmethod
    def lines(found):
        return [f"{kind}: {n} ({'; '.join(examples)}{'; ...' if n > len(examples) else ''})"
                for kind, (n, examples) in found.items()]


def _ann(a):
    return f"annotation {a.get('id')} of image {a.get('image_id')}"


def _check_categories(data, f):
    cats = [c for c in data.get("categories") or [] if isinstance(c, dict)]
    for cid, n in _repeated(cats, "id").items():
        f.add("repeated category ids", f"id {cid!r} {n} times")
    for name, n in _repeated(cats, "name").items():
        f.add("repeated category names (detectron2's classes are named by them)", f"{name!r} {n} times")
    return {c.get("id") for c in cats}


def _check_images(data, f):
    images = [i for i in data.get("images") or [] if isinstance(i, dict)]
    for iid, n in _repeated(images, "id").items():
        f.add("repeated image ids (annotations would attach to one of the images)", f"id {iid!r} {n} times")
    for name, n in _repeated(images, "file_name").items():
        f.add("images listed more than once under one file_name", f"{name!r} {n} times", warning=True)
    return {i.get("id"): i for i in images}


def _check_segmentation(a, image, f):
    segm = a.get("segmentation")
    if not segm:  # absent or empty: a box-only annotation (detectron2 keeps its box)
        return
    if isinstance(segm, dict):  # RLE
        size = segm.get("size")
        if not (isinstance(size, list) and len(size) == 2):
            f.add("RLE without a [height, width] size", _ann(a))
        elif image is not None and [image.get("height"), image.get("width")] != list(size):
            f.add("RLE of another size than its image",
                  f"{_ann(a)}: size {size}, the image is {image.get('height')} x {image.get('width')} (h x w)")
        return
    if not isinstance(segm, list) or not all(isinstance(p, list) for p in segm):
        f.add("segmentation that is neither polygons nor an RLE", _ann(a))
        return
    if not all(_all_finite(p) for p in segm):
        f.add("polygons with a coordinate that is not a finite number", _ann(a))
        return
    bad = [len(p) for p in segm if len(p) < 6 or len(p) % 2]
    if bad:  # detectron2 drops such polygons, and the whole instance (its box too) when none is left
        f.add("polygons with fewer than 6 coordinates or an odd number (detectron2 drops them, and the "
              "instance with its box when no polygon is left)", f"{_ann(a)}: lengths {bad}")


def _check_annotation(a, images, categories, f):
    if a.get("image_id") not in images:
        f.add("annotations whose image_id has no image (detectron2 drops them with a warning)", _ann(a))
    if a.get("category_id") not in categories:
        f.add("annotations naming a category the file's 'categories' lack",
              f"{_ann(a)}: category_id {a.get('category_id')!r}; known ids: {sorted(categories, key=str)}")
    box = a.get("bbox")
    if not (isinstance(box, list) and len(box) == 4):
        f.add("bbox that is not 4 numbers [x, y, w, h]", f"{_ann(a)}: bbox {box!r}")
    elif not _all_finite(box):
        f.add("bbox with a value that is not a finite number (NaN, inf, text)", f"{_ann(a)}: bbox {box}")
    elif not (box[2] > 0 and box[3] > 0):
        f.add("boxes without positive width and height", f"{_ann(a)}: bbox {box}, as [x, y, w, h]")
    if "area" in a and not (_finite(a["area"]) and a["area"] >= 0):
        f.add("area that is not a finite number >= 0 (COCO's size ranges use it)", f"{_ann(a)}: area {a['area']!r}")
    if a.get("iscrowd", 0) not in (0, 1):
        f.add("iscrowd other than 0 or 1", f"{_ann(a)}: iscrowd {a.get('iscrowd')!r}")
    if a.get("ignore", 0) not in (0, None):
        f.add("'ignore' set (detectron2 does not support it; use iscrowd 1)", _ann(a))
    _check_segmentation(a, images.get(a.get("image_id")), f)


def check_annotations(data, json_file, name):
    """Raises :class:`AnnotationError` listing every problem of the COCO instances json ``data``
    (loaded from ``json_file``, registered as dataset ``name``); warns about the legitimate oddities."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        return  # not an instances file: load_coco_dataset's error says so
    f = _Findings()
    categories = _check_categories(data, f)
    images = _check_images(data, f)
    anns = [a for a in data.get("annotations") or [] if isinstance(a, dict)]
    for aid, n in _repeated(anns, "id").items():
        # detectron2 allows them in COCO 2014's minival files, whose duplicates are a known, tiny bug
        f.add("repeated annotation ids", f"id {aid!r} {n} times", warning="minival" in json_file)
    for a in anns:
        _check_annotation(a, images, categories, f)
    for line in f.lines(f.warnings):
        logger.warning(f"dataset '{name}' ({json_file}): {line}")
    if f.errors:
        raise AnnotationError(f"dataset '{name}': {json_file} has annotations that would be trained or scored "
                              "wrongly:\n  " + "\n  ".join(f.lines(f.errors))
                              + "\n(docs/training.md, 'COCO json checks', says why each is refused.)")

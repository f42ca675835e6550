"""Data checks that name bad data before it costs a run, and image errors that name the file.

Three kinds of bad data cost detectron2 users runs, and detectron2 names none of them up front:

- **class counts**: a dataset with more (or fewer) categories than a model head has classes trains
  without a word. :func:`check_num_classes` compares the heads the meta architecture builds
  (``MODEL.RETINANET.NUM_CLASSES``; ``MODEL.ROI_HEADS.NUM_CLASSES`` for the ROI box head and, unless
  ``MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK``, the mask head) with every training and test dataset's
  categories. Metadata only: on by default (``DATASETS.CHECK_NUM_CLASSES``).
- **unreadable images and wrong sizes**: :func:`check_images` opens every image file of a dataset in
  a few processes, with a progress bar, and reports all bad files in one error: ``"headers"`` reads
  the header only (size, EXIF orientation: what detectron2's reader turns the image into) and
  compares it with the json's width/height, and finds missing, unreadable and non-image files;
  ``"decode"`` also decodes every pixel, and so finds truncated and corrupt files too
  (``DATASETS.CHECK_IMAGES``; "headers" by default).
- **a bad file met during training** (e.g. a truncated file under "headers"): :class:`NameImageErrors`
  wraps the dataset mapper so that the error names the file and the dataset, instead of a bare
  ``OSError: image file is truncated`` from a data-loader worker.

None of them draws random numbers, reorders data or changes the dataset dicts.
"""
import logging
import multiprocessing
import os
import struct
import time
import zlib

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.utils.file_io import PathManager
from PIL import Image

logger = logging.getLogger(__name__)

CHECK_IMAGE_MODES = ("none", "headers", "decode")
# The default of DATASETS.CHECK_IMAGES. Reading headers costs 0.06-0.14 s per 1000 images (README.md,
# "Data checks"; seconds for COCO) and finds what a json/image-folder mix-up produces (missing,
# non-image, resized or rotated files). A full decode costs ~35x that (minutes for COCO, on every run
# and resume), so it is asked for (once per dataset: tools/train_net.py --check-data-only), and a
# truncated file that "headers" misses is named, with its dataset, when training reads it.
DEFAULT_CHECK_IMAGES = "headers"
MAX_LISTED = 10  # bad files listed in an error; the rest are counted
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# What reading an image can raise: PIL's errors (UnidentifiedImageError and "image file is
# truncated" are OSErrors; some decoders raise SyntaxError, struct.error or zlib.error), files that
# are missing or unreadable (OSError), and detectron2's check of the json's width/height.
IMAGE_ERRORS = (OSError, SyntaxError, struct.error, zlib.error, Image.DecompressionBombError, SizeMismatchError)


class DataError(ValueError):
    """Bad data found before (or while) training: the message names the dataset and the file or key."""


class ClassCountError(DataError):
    """A model head's number of classes differs from a dataset's number of categories."""


class BadImagesError(DataError):
    """Image files that cannot be read, or whose size differs from the json's (an up-front check)."""


class ImageReadError(DataError):
    """An image that could not be read while training or evaluating (names the file and dataset)."""


# ---------------------------------------------------------------------------------------------
# Class counts


def head_classes(cfg):
    """``{config key: (number of classes, [heads])}`` of the class-predicting heads that
    ``cfg.MODEL.META_ARCHITECTURE`` builds; empty for architectures without such heads (or unknown)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "RetinaNet":
        return {"MODEL.RETINANET.NUM_CLASSES": (cfg.MODEL.RETINANET.NUM_CLASSES, ["RetinaNet head"])}
    if arch in ("GeneralizedRCNN", "PanopticFPN"):
        heads = ["ROI box head"]
        if cfg.MODEL.MASK_ON and not cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK:
            heads.append("mask head")
        return {"MODEL.ROI_HEADS.NUM_CLASSES": (cfg.MODEL.ROI_HEADS.NUM_CLASSES, heads)}
    return {}


def dataset_num_classes(name, load=None):
    """``(n, exact, source)``: the number of categories of registered dataset ``name``.

    From its metadata's ``thing_classes`` when set (built-in and synthetic datasets set them at
    registration; a COCO json sets them when loaded), else from the dataset dicts (``load()``, or
    ``DatasetCatalog.get(name)``): their metadata once loaded, or else the largest ``category_id`` + 1,
    which is only a lower bound (``exact`` False). ``(None, False, why)`` for a dataset without
    categories (no annotations, e.g. an unlabelled test set)."""
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None:
        dicts = load() if load is not None else DatasetCatalog.get(name)
        if meta.get("thing_classes") is None:
            ids = {a["category_id"] for d in dicts for a in d.get("annotations", ()) if "category_id" in a}
            if not ids:
                return None, False, "no thing_classes in its metadata and no annotations"
            return max(ids) + 1, False, f"no thing_classes in its metadata; its largest category_id is {max(ids)}"
    return len(meta.thing_classes), True, "thing_classes"


def _describe(name):
    meta = MetadataCatalog.get(name)
    source = meta.get("voc_split_file") or meta.get("json_file")  # a VOC dataset's json is a cached conversion
    return f"dataset '{name}'" + (f" ({source})" if source else "")


def check_num_classes(cfg, datasets, load=None):
    """Raises :class:`ClassCountError` when a head of the model ``cfg`` builds has another number of
    classes than one of ``datasets`` (``[(name, config key)]``, e.g. ``("coco_2017_val",
    "DATASETS.TEST")``) has categories, naming both numbers, the config key and the dataset; every
    mismatch in one error. A dataset whose categories are known only as a lower bound (see
    :func:`dataset_num_classes`) fails only when it needs more classes than the head has.

    ``load(name)`` returns the dataset dicts when they are needed and already at hand."""
    heads = head_classes(cfg)
    if not heads or not cfg.DATASETS.get("CHECK_NUM_CLASSES", True):
        return
    problems = []
    for name, role in datasets:
        n, exact, source = dataset_num_classes(name, None if load is None else (lambda name=name: load(name)))
        if n is None:
            logger.info(f"{_describe(name)} ({role}): {source}; its number of classes is not checked")
            continue
        for key, (num_classes, names) in heads.items():
            if num_classes == n or (not exact and n < num_classes):
                continue
            has = f"{n} categories ({source})" if exact else f"at least {n} categories ({source})"
            problems.append(f"{key} is {num_classes} ({' and '.join(names)}) but {_describe(name)} in {role} has "
                            f"{has}: set {key} {n}" + ("" if exact else " or more"))
    if problems:
        raise ClassCountError(
            "the model's number of classes does not match the data:\n  " + "\n  ".join(problems)
            + "\n(If the difference is deliberate, DATASETS.CHECK_NUM_CLASSES False turns this check off.)")


# ---------------------------------------------------------------------------------------------
# Image files


def check_mode(cfg):
    """``cfg.DATASETS.CHECK_IMAGES`` (the default when the cfg lacks it), validated."""
    mode = cfg.DATASETS.get("CHECK_IMAGES", DEFAULT_CHECK_IMAGES)
    if mode not in CHECK_IMAGE_MODES:
        raise ValueError(f"DATASETS.CHECK_IMAGES must be one of {CHECK_IMAGE_MODES}, got {mode!r}")
    return mode


def _inspect(task):
    """What is wrong with one image file (None if nothing): ``task`` = (file name, the json's
    (width, height) or None, whether to decode). Runs in the checking processes."""
    file_name, expected_wh, decode = task
    try:
        with PathManager.open(file_name, "rb") as f, Image.open(f) as image:
            width, height = image.size
            try:  # as detectron2's read_image: an unreadable EXIF block is no orientation
                orientation = image.getexif().get(_EXIF_ORIENTATION)
            except Exception:
                orientation = None
            if orientation in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            if decode:
                image.load()
    except Exception as e:  # noqa: BLE001  whatever the file raises is the finding
        return f"{type(e).__name__}: {e}"
    if expected_wh is not None and (width, height) != expected_wh:
        rotated = " after its EXIF orientation" if orientation in _TRANSPOSING_ORIENTATIONS else ""
        return (f"the json says width {expected_wh[0]} x height {expected_wh[1]}, the file is {width} x {height}"
                f"{rotated}")
    return None


def _expected_size(d):
    # detectron2's check_image_size compares both when either is given
    if "width" in d or "height" in d:
        return d.get("width"), d.get("height")
    return None


def find_bad_images(dicts, mode="headers", num_workers=0, progress=True, desc="checking images"):
    """``[(file name, problem)]`` for the images of dataset dicts ``dicts`` that fail ``mode``
    ("headers" or "decode", see the module docstring), in dataset order.

    ``num_workers`` > 1 checks in that many processes; a tqdm progress bar shows unless ``progress``
    is False."""
    from tqdm import tqdm

    if mode not in ("headers", "decode"):
        raise ValueError(f"mode must be 'headers' or 'decode', got {mode!r}")
    tasks = [(d["file_name"], _expected_size(d), mode == "decode") for d in dicts]
    workers = min(int(num_workers), len(tasks))
    # a few chunks per process, so that the bar moves and the processes finish together
    chunk = max(1, min(16 if mode == "decode" else 64, len(tasks) // (4 * max(workers, 1))))
    bad = []
    with tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress, mininterval=0.5) as bar:
        if workers > 1:
            methods = multiprocessing.get_all_start_methods()
            # fork, as detectron2's data-loader workers: the children only open files with PIL
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ctx.Pool(workers) as pool:
                results = list(_progress(pool.imap(_inspect, tasks, chunksize=chunk), bar))
        else:
            results = list(_progress(map(_inspect, tasks), bar))
    for (file_name, _, _), problem in zip(tasks, results):
        if problem is not None:
            bad.append((file_name, problem))
    return bad


def _progress(results, bar):
    for r in results:
        bar.update(1)
        yield r


def _format_bad(label, bad, total, mode):
    shown = "\n    ".join(f"{f}: {p}" for f, p in bad[:MAX_LISTED])
    more = f"\n    ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return f"{label}: {len(bad)} of {total} images fail the '{mode}' check:\n    {shown}{more}"


def _bad_images_error(sections, mode):
    return BadImagesError(
        f"bad image files (DATASETS.CHECK_IMAGES {mode}), found before training:\n  " + "\n  ".join(sections)
        + "\nFix or replace these files, or correct their entries (file_name, width, height) in the json. "
        "DATASETS.CHECK_IMAGES none skips this check.")


def check_images(dicts, name, mode="headers", num_workers=0, progress=True):
    """Raises :class:`BadImagesError` listing every image of dataset ``name`` (its dicts ``dicts``)
    that fails ``mode`` (the first :data:`MAX_LISTED` named, the rest counted), naming the dataset
    and its json. Returns ``{"images": n, "seconds": s}``."""
    start = time.perf_counter()
    bad = find_bad_images(dicts, mode, num_workers, progress, desc=f"checking images ({mode}) of '{name}'")
    if bad:
        raise _bad_images_error([_format_bad(_describe(name), bad, len(dicts), mode)], mode)
    return {"images": len(dicts), "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# Which dataset an image belongs to


def _image_roots(names):
    roots = []
    for name in names:
        root = MetadataCatalog.get(name).get("image_root")
        if root:
            roots.append((os.path.join(os.path.abspath(root), ""), name))
    return sorted(roots, key=lambda r: -len(r[0]))  # the most specific root first


def dataset_of(file_name, names, roots=None):
    """The name of the dataset among ``names`` that ``file_name`` belongs to (by the datasets'
    ``image_root``; the one dataset if ``names`` has one), else None."""
    names = list(names)
    if len(names) == 1:
        return names[0]
    path = os.path.abspath(file_name)
    for root, name in roots if roots is not None else _image_roots(names):
        if path.startswith(root):
            return name
    return None


def _label(name, names):
    """'dataset 'x' (json)', or for None (no image_root matched) a phrase naming all of ``names``."""
    if name is not None:
        return _describe(name)
    return "one of the datasets " + ", ".join(f"'{n}'" for n in names)


def split_by_dataset(dicts, names):
    """``[(dataset name or None, dicts)]``: a merged list (a training set of several datasets) by
    dataset; None gathers images under no dataset's image_root."""
    names = list(names)
    roots = _image_roots(names)
    groups = {}
    for d in dicts:
        groups.setdefault(dataset_of(d["file_name"], names, roots), []).append(d)
    return list(groups.items())


# ---------------------------------------------------------------------------------------------
# Before a run


def check_data(cfg, train=True, test=True, train_dicts=None, images=True, mode=None, num_workers=None,
               progress=True):
    """The checks before a run of ``cfg``: the class counts of its heads against the categories of
    every dataset in DATASETS.TRAIN (if ``train``) and DATASETS.TEST (if ``test``), then, when
    ``images`` and ``mode`` (default: DATASETS.CHECK_IMAGES) is not "none", the image files of those
    datasets; all bad files of all datasets in one :class:`BadImagesError`.

    ``train_dicts``: the training set as the training loader has it (the datasets merged, images
    without annotations dropped): checked as it is; otherwise each training dataset is loaded.
    ``num_workers``: checking processes (default DATALOADER.NUM_WORKERS).

    Returns ``{dataset name: {"images": n, "seconds": s}}`` for the datasets whose images were checked.
    """
    mode = check_mode(cfg) if mode is None else mode
    if mode not in CHECK_IMAGE_MODES:
        raise ValueError(f"mode must be one of {CHECK_IMAGE_MODES}, got {mode!r}")
    train_names = list(cfg.DATASETS.TRAIN) if train else []
    test_names = list(cfg.DATASETS.TEST) if test else []
    loaded = {}

    def load(name):
        if name not in loaded:
            if train_dicts is not None and train_names == [name]:
                loaded[name] = train_dicts
            else:
                loaded[name] = DatasetCatalog.get(name)
        return loaded[name]

    check_num_classes(cfg, [(n, "DATASETS.TRAIN") for n in train_names]
                      + [(n, "DATASETS.TEST") for n in test_names], load)
    if not images or mode == "none":
        return {}
    if train_dicts is not None and train_names:
        groups = split_by_dataset(train_dicts, train_names)
    else:
        groups = [(n, load(n)) for n in train_names]
    groups += [(n, load(n)) for n in test_names if n not in train_names]
    num_workers = cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers
    sections, report = [], {}
    for name, dicts in groups:
        label = _label(name, train_names)
        start = time.perf_counter()
        desc = f"checking images ({mode}) of " + (f"'{name}'" if name is not None else "the training set")
        bad = find_bad_images(dicts, mode, num_workers, progress, desc=desc)
        seconds = time.perf_counter() - start
        report[name] = {"images": len(dicts), "seconds": seconds}
        if bad:
            sections.append(_format_bad(label, bad, len(dicts), mode))
        else:
            logger.info(f"DATASETS.CHECK_IMAGES {mode}: the {len(dicts)} images of {label} are fine ({seconds:.1f} s)")
    if sections:
        raise _bad_images_error(sections, mode)
    return report


# ---------------------------------------------------------------------------------------------
# During a run


class NameImageErrors:
    """Wraps a dataset mapper (e.g. detectron2's ``DatasetMapper``): an image that cannot be read
    while training or evaluating (truncated, corrupt, missing, or another size than the json says)
    raises :class:`ImageReadError` naming the file and the dataset, with the original error chained;
    otherwise the mapper's output, untouched.

    ``dataset_names``: the datasets the mapped dicts come from (the file's is found by image_root)."""

    def __init__(self, mapper, dataset_names):
        self.mapper = mapper
        self.dataset_names = list(dataset_names)
        self._roots = _image_roots(self.dataset_names)

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except IMAGE_ERRORS as e:
            file_name = dataset_dict.get("file_name", "<no file_name>")
            where = _label(dataset_of(file_name, self.dataset_names, self._roots), self.dataset_names)
            hint = ("DATASETS.CHECK_IMAGES decode finds every such file before training"
                    if not isinstance(e, SizeMismatchError) else
                    "DATASETS.CHECK_IMAGES headers (the default) finds every such file before training")
            extra = dataset_dict.get("sem_seg_file_name")
            also = f" (or its sem_seg_file_name {extra})" if extra else ""
            raise ImageReadError(f"{where}: cannot read image {file_name}{also}: {type(e).__name__}: {e}\n"
                                 f"({hint})") from e

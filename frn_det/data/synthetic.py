"""A deterministic synthetic instance-segmentation dataset in COCO format.

Each image holds a few filled shapes of five classes on a textured, noisy background. Shapes are
painted in order, so later ones occlude earlier ones; every annotation describes the *visible* part
of its object: the mask is computed after occlusion, and the box and area are those of that mask.
Instances whose visible part is too small are dropped.

Every image is drawn from its own generator seeded by ``(seed, split, index)``, so the output
depends only on the arguments, not on the order or the number of images generated before it.

The cluttered variant (``clutter`` > 0 and/or ``texture`` > 0) paints unlabelled distractors
(strokes and irregular blobs) and high-frequency texture on the background, from a separate random
stream: its objects, classes, sizes, places, colours and annotations are exactly those of the plain
dataset with the same seed, so that a channel's energy comes from the scene, as in natural images,
and not from the 1-4 objects alone; only what lies behind the objects differs.
"""
import fcntl
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_write

CLASSES = ("rectangle", "ellipse", "triangle", "ring", "star")
# Bump when the drawing changes, so that datasets cached on disk are regenerated.
GENERATOR_VERSION = 3
SPLITS = ("train", "val")
_SPLIT_SEED = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. The defaults are the CPU benchmark task (docs/results.md) and `make demo`'s.

    Args:
        num_train, num_val: number of images per split.
        image_size: width and height in pixels.
        min_objects, max_objects: objects painted per image (before invisible ones are dropped).
        min_size, max_size: smallest and largest object extent in pixels (log-uniform between).
        min_visible_area: instances whose visible mask has fewer pixels are not annotated.
        max_occlusion: a new object is redrawn (up to 20 times, else left out) while it would hide
            more than this fraction of an earlier object's visible pixels; 1.0 allows any occlusion.
        inside: objects lie wholly inside the image (else they may be cut by its border).
        mask_format: "polygon" (COCO polygons traced from the visible mask; holes, such as a
            ring's, are filled since COCO polygons are unioned) or "rle" (exact masks; detectron2
            then needs INPUT.MASK_FORMAT bitmask).
        seed: the seed all images derive from.
        clutter: unlabelled distractors painted behind the objects per image (strokes and
            irregular blobs, 0 = none).
        texture: amplitude (0-255 scale) of the high-frequency gratings added to the background
            (0 = none).

    The defaults: 192 px images whose objects (24-80 px) match RetinaNet's P3-P5 anchors, so every
    feature map a detector uses is at least 6x6 (FRN normalises each plane by its own energy), with
    little occlusion, so that box labels are learnable and detectors reach a high AP on CPU.
    """

    num_train: int = 2000
    num_val: int = 500
    image_size: int = 192
    min_objects: int = 1
    max_objects: int = 4
    min_size: int = 24
    max_size: int = 80
    min_visible_area: int = 16
    max_occlusion: float = 0.25
    inside: bool = True
    mask_format: str = "polygon"
    seed: int = 0
    clutter: int = 0
    texture: float = 0.0

    def __post_init__(self):
        if self.mask_format not in ("polygon", "rle"):
            raise ValueError(f"mask_format must be 'polygon' or 'rle', got {self.mask_format!r}")
        if not 3 * self.min_size <= self.image_size:
            raise ValueError(f"image_size {self.image_size} is too small for min_size {self.min_size}")
        if not self.min_size <= self.max_size <= self.image_size:
            raise ValueError(f"need min_size <= max_size <= image_size, got {self.min_size}, {self.max_size}, "
                             f"{self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.max_occlusion <= 1:
            raise ValueError(f"max_occlusion must be in (0, 1], got {self.max_occlusion}")
        if self.clutter < 0 or not 0 <= self.texture <= 255:
            raise ValueError(f"need clutter >= 0 and 0 <= texture <= 255, got {self.clutter}, {self.texture}")

    def num_images(self, split):
        return {"train": self.num_train, "val": self.num_val}[split]


# The cluttered variant of the default task (registered as frn_synthetic_clutter_{train,val}).
CLUTTERED_SPEC = SyntheticSpec(clutter=12, texture=24.0)


def _shape_polygon(cls, rng, extent):
    """Vertices (N, 2) of a shape centred at the origin that fits in a circle of diameter ``extent``."""
    r = extent / 2.0
    if cls == "rectangle":
        aspect = rng.uniform(0.35, 1.0)
        w = r / math.sqrt(1 + aspect**2)  # half-diagonal r
        h = aspect * w
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
    elif cls in ("ellipse", "ring"):
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = np.stack([r * np.cos(t), r * rng.uniform(0.5, 1.0) * np.sin(t)], axis=1)
    elif cls == "triangle":
        t = np.array([0.0, 2.0, 4.0]) * math.pi / 3 + rng.uniform(-0.3, 0.3, size=3)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif cls == "star":
        t = np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.35, 0.5))
        pts = np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)
    else:
        raise ValueError(f"unknown class {cls!r}")
    a = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return pts @ rot.T


def _paint(shape, size):
    """Rasterise vertices (N, 2) into a boolean (size, size) mask."""
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in shape], fill=1)
    return np.asarray(img, dtype=bool)


def _object_mask(cls, rng, spec):
    size = spec.image_size
    extent = math.exp(rng.uniform(math.log(spec.min_size), math.log(spec.max_size)))
    margin = extent / 2 if spec.inside else extent / 4  # else the border may cut a quarter off
    centre = rng.uniform(margin, size - margin, size=2)
    outer = _shape_polygon(cls, rng, extent)
    mask = _paint(outer + centre, size)
    if cls == "ring":
        # The hole scales the same outline, so the ring keeps the ellipse's aspect and rotation.
        mask &= ~_paint(outer * rng.uniform(0.45, 0.65) + centre, size)
    return mask


def _background(rng, size):
    """Low-frequency colour noise around a base colour plus pixel noise: never a flat colour."""
    grid = (rng.integers(2, 6), rng.integers(2, 6), 3)
    coarse = np.clip(rng.uniform(40, 215, size=3) + rng.uniform(-60, 60, size=grid), 0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return smooth + rng.normal(0, rng.uniform(4, 16), size=(size, size, 3))


def _clutter(rng, spec, img):
    """Adds ``spec.texture`` gratings and ``spec.clutter`` distractors to a background, in place.

    Distractors are strokes (polylines 1-4 px wide) and blobs with jagged outlines (12-20 vertices,
    radii varying 2x), sized like the objects, in any colour: no class's outline.
    """
    size = spec.image_size
    if spec.texture:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        for _ in range(3):
            period, angle = rng.uniform(2.5, 8.0), rng.uniform(0, math.pi)
            phase = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period + rng.uniform(0, 2 * math.pi)
            img += (spec.texture / 3) * np.sin(phase)[..., None] * rng.uniform(-1, 1, size=3)
    for _ in range(spec.clutter):
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        extent = math.exp(rng.uniform(math.log(spec.min_size), math.log(spec.max_size)))
        centre = rng.uniform(0, size, size=2)
        if rng.uniform() < 0.5:
            pts = centre + np.cumsum(rng.normal(0, extent / 3, size=(int(rng.integers(2, 6)), 2)), axis=0)
            draw.line([tuple(p) for p in pts], fill=1, width=int(rng.integers(1, 5)))
        else:
            t = np.sort(rng.uniform(0, 2 * math.pi, size=int(rng.integers(12, 21))))
            radii = extent / 2 * rng.uniform(0.5, 1.0, size=t.size)
            draw.polygon([tuple(p) for p in centre + np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)], fill=1)
        mask = np.asarray(layer, dtype=bool)
        img[mask] = rng.uniform(0, 255, size=3) + rng.normal(0, rng.uniform(2, 12), size=(int(mask.sum()), 3))


def _colour_far_from(rng, ref):
    """An object colour at least ~100 (L2 in RGB) away from the background colour under it."""
    for _ in range(20):
        c = rng.uniform(0, 255, size=3)
        if np.linalg.norm(c - ref) > 100:
            return c
    return 255.0 - ref


def render_image(spec, split, index):
    """Returns (uint8 image (H, W, 3), objects) for one image, objects a list of
    (category_id, visible bool mask, painted bool mask) in painting order."""
    img, _, objects = render_scene(spec, split, index)
    return img, objects


def render_scene(spec, split, index):
    """:func:`render_image` as (image, background, objects): ``background`` (uint8) is what lies behind
    the objects (with its clutter), so that an object can be shown on it alone."""
    rng = np.random.default_rng([spec.seed, _SPLIT_SEED[split], index])
    size = spec.image_size
    plain = _background(rng, size)  # object colours are chosen against it, so clutter changes no object
    img = plain.copy()
    if spec.clutter or spec.texture:
        _clutter(np.random.default_rng([spec.seed, _SPLIT_SEED[split], index, 1]), spec, img)
    background = np.clip(img, 0, 255).astype(np.uint8)
    objects = []
    for _ in range(rng.integers(spec.min_objects, spec.max_objects + 1)):
        for _ in range(20):
            cat = int(rng.integers(len(CLASSES)))
            mask = _object_mask(CLASSES[cat], rng, spec)
            if all((mask & visible).sum() <= spec.max_occlusion * visible.sum() for _, visible, _ in objects):
                break
        else:
            continue  # no placement hides little enough of the others
        if not mask.any():
            continue
        colour = _colour_far_from(rng, plain[mask].mean(axis=0))
        texture = rng.normal(0, rng.uniform(2, 12), size=(int(mask.sum()), 3))
        img[mask] = colour + texture
        plain[mask] = img[mask]
        # Occlusion: the new object hides whatever it covers of the earlier ones.
        objects = [(c, m & ~mask, full) for c, m, full in objects]
        objects.append((cat + 1, mask, mask))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img, background, [o for o in objects if o[1].sum() >= spec.min_visible_area]


def _mask_to_polygons(mask):
    """Outer boundaries of a mask's connected parts as COCO polygons (pixel-corner coordinates)."""
    from contourpy import FillType, contour_generator

    # Pad so that parts touching the border are closed; marching squares at 0.5 runs halfway
    # between pixel centres, and pixel (r, c) spans [c, c + 1] in COCO's coordinates.
    z = np.pad(mask, 1).astype(np.float64)
    points, offsets = contour_generator(z=z, fill_type=FillType.OuterOffset).filled(0.5, 2.0)
    polys = []
    for pts, off in zip(points, offsets):
        outer = pts[off[0] : off[1] - 1] - 1 + 0.5  # drop the closing point, undo the padding
        if len(outer) >= 3:
            polys.append([round(float(v), 2) for v in outer.reshape(-1)])
    return polys


def _annotation(mask, category_id, ann_id, image_id, mask_format):
    from pycocotools import mask as mask_util

    h, w = mask.shape
    if mask_format == "polygon":
        segm = _mask_to_polygons(mask)
        if not segm:
            return None
        # The annotation is what the polygons rasterise to, so box and area agree with it exactly.
        rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
    else:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        segm = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    area = float(mask_util.area(rle))
    if area == 0:
        return None
    x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segm,
            "area": area, "bbox": [x, y, bw, bh], "iscrowd": 0}


LOCK_FILE = ".generating.lock"


def annotation_path(root, split):
    return os.path.join(root, "annotations", f"instances_{split}.json")


def image_dir(root, split):
    return os.path.join(root, split)


def generate_split(spec, root, split, progress=True):
    """Writes ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json``.

    The json is written last (atomically), so its presence means the split is complete.
    Returns the json path.
    """
    from tqdm import tqdm

    os.makedirs(image_dir(root, split), exist_ok=True)
    os.makedirs(os.path.dirname(annotation_path(root, split)), exist_ok=True)
    images, annotations = [], []
    n = spec.num_images(split)
    for index in tqdm(range(n), desc=f"frn_synthetic {split}", unit="img", disable=not progress):
        img, objects = render_image(spec, split, index)
        file_name = f"{index:06d}.png"
        Image.fromarray(img).save(os.path.join(image_dir(root, split), file_name))
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": spec.image_size,
                       "width": spec.image_size})
        for cat, mask, _ in objects:
            ann = _annotation(mask, cat, len(annotations) + 1, image_id, spec.mask_format)
            if ann is not None:
                annotations.append(ann)
    coco = {
        "info": {"description": f"frn-det synthetic shapes, {split} split",
                 "generator": _generator_info(spec, split)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)],
    }
    path = annotation_path(root, split)
    with atomic_write(path) as f:  # a temporary name of its own: two processes may generate one root
        json.dump(coco, f)
    return path


def _generator_info(spec, split):
    return {"version": GENERATOR_VERSION, "split": split, **spec.__dict__}


def spec_of(json_file):
    """(spec, split) that generated the annotation file ``json_file``, so that its images can be drawn
    again; ValueError naming the file if this generator's current version did not write it."""
    with open(json_file) as f:
        gen = dict(json.load(f).get("info", {}).get("generator") or {})
    version, split = gen.pop("version", None), gen.pop("split", None)
    if version != GENERATOR_VERSION or split not in SPLITS:
        raise ValueError(f"{json_file} was not written by this synthetic generator (version {GENERATOR_VERSION}): "
                         f"its info.generator has version {version!r}, split {split!r}")
    return SyntheticSpec(**gen), split


def is_generated(root, spec):
    """Whether ``root`` holds both splits generated with exactly ``spec``."""
    for split in SPLITS:
        try:
            with open(annotation_path(root, split)) as f:
                gen = json.load(f)["info"]["generator"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if gen != _generator_info(spec, split):
            return False
    return True


def generate(spec, root, progress=True):
    """Generates both splits under ``root`` unless they are already there with the same spec.
    Processes generating the same root at once take turns (a lock file in it), so that none reads
    an image while another rewrites it: the later ones find the dataset made."""
    if not is_generated(root, spec):
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, LOCK_FILE), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not is_generated(root, spec):
                for split in SPLITS:
                    generate_split(spec, root, split, progress=progress)
    return {split: annotation_path(root, split) for split in SPLITS}

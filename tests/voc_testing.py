"""Small Pascal VOC folders for the tests: a JPEG of noise and an xml file per image id, split files."""
import os
import random
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image


def box(name, xmin, ymin, xmax, ymax, difficult=0):
    """One <object>: VOC's 1-based inclusive pixel box (values written as given, so strings test parsing)."""
    return {"name": name, "bndbox": (xmin, ymin, xmax, ymax), "difficult": difficult}


def annotation_xml(fileid, width, height, objects):
    objs = "".join(
        f"<object><name>{escape(str(o['name']))}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{o['difficult']}</difficult><bndbox>"
        + "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), o["bndbox"]))
        + "</bndbox></object>" for o in objects)
    return (f"<annotation><folder>JPEGImages</folder><filename>{fileid}.jpg</filename>"
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>{objs}</annotation>")


def write_voc(root, images, splits):
    """``images``: {id: (width, height, [box(...)])}; ``splits``: {split: [ids]}. Returns ``root``."""
    for sub in ("Annotations", os.path.join("ImageSets", "Main"), "JPEGImages"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    rng = np.random.default_rng(0)
    for fileid, (w, h, objects) in images.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(root, "JPEGImages", f"{fileid}.jpg"))
        with open(os.path.join(root, "Annotations", f"{fileid}.xml"), "w") as f:
            f.write(annotation_xml(fileid, w, h, objects))
    for split, ids in splits.items():
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return str(root)


def cells_folder(root, n=8, size=64, seed=0):
    """A trainable folder: ``n`` images of ``size`` px with 1-3 boxes of two classes ("cat", "dog"),
    split train (the first 3/4) and val; returns ``root``."""
    rnd = random.Random(seed)
    images = {}
    for i in range(n):
        objects = []
        for _ in range(rnd.randint(1, 3)):
            s = rnd.randint(size // 4, size // 2)
            x, y = rnd.randint(1, size - s), rnd.randint(1, size - s)
            objects.append(box(rnd.choice(("cat", "dog")), x, y, x + s - 1, y + s - 1))
        images[f"img{i:02d}"] = (size, size, objects)
    ids = sorted(images)
    return write_voc(root, images, {"train": ids[: n * 3 // 4], "val": ids[n * 3 // 4:], "trainval": ids})

"""`make demo`: RetinaNet R18-FPN with BN, GN and FRN on the synthetic dataset, on CPU: each norm
trained and evaluated through tools/train_net.py, then an AP table and a bar plot."""
import math
import os
import subprocess
import sys

from .paths import CONFIGS, TOOLS
from .results import read_result

CONFIG = os.path.join(CONFIGS, "synthetic", "retinanet_R18_FPN_{}.yaml")
METRICS = ("AP", "AP50", "AP75", "APs", "APm")
LABEL_WIDTH = 96  # pixels of the strip naming the norm on the left of its detections picture


def run_norm(norm, output_dir, resume, opts):
    cmd = [sys.executable, os.path.join(TOOLS, "train_net.py"), "--config-file", CONFIG.format(norm)]
    cmd += ["--resume"] if resume else []
    cmd += ["OUTPUT_DIR", os.path.join(output_dir, norm), *opts]
    print(f"\n==== {norm}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    return read_result(os.path.join(output_dir, norm))


def _fmt(v):
    return "  n/a" if v is None or math.isnan(v) else f"{v:5.1f}"


def table(results):
    lines = ["| norm | " + " | ".join(METRICS) + " | iterations | wall time (s) |",
             "|---|" + "---|" * len(METRICS) + "---|---|"]
    for norm, r in results.items():
        bbox = r["results"]["bbox"]
        lines.append(f"| {norm} | " + " | ".join(_fmt(bbox[m]) for m in METRICS)
                     + f" | {r['max_iter']} | {r['wall_time_s']:.0f} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("AP", "AP50", "AP75")
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (norm, r) in enumerate(results.items()):
        vals = [r["results"]["bbox"][m] or 0.0 for m in metrics]
        bars = ax.bar([j + (i - (len(results) - 1) / 2) * width for j in range(len(metrics))], vals, width, label=norm)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    first = next(iter(results.values()))
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("box AP (%)")
    ax.set_title(f"RetinaNet R18-FPN, synthetic val, {first['ims_per_batch']} images/batch, "
                 f"{first['max_iter']} iterations", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_detections(norm, output_dir, num_images=4, min_score=0.3):
    """A picture of one norm's detections (score >= ``min_score``, detectron2's Visualizer) on the first
    ``num_images`` images of its test set, side by side after a strip naming the norm; returns its
    path (output_dir/detections_<NORM>.png)."""
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog, detection_utils
    from detectron2.modeling import build_model
    from detectron2.utils.visualizer import Visualizer
    from PIL import Image, ImageDraw, ImageFont

    from .checkpoint import ShapeCheckingCheckpointer
    from .config import load_run_cfg

    cfg = load_run_cfg(CONFIG.format(norm), ["MODEL.WEIGHTS", os.path.join(output_dir, norm, "model_final.pth")])
    model = build_model(cfg).eval()
    ShapeCheckingCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    name = cfg.DATASETS.TEST[0]
    tiles = []
    for record in DatasetCatalog.get(name)[:num_images]:
        image = detection_utils.read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        with torch.no_grad():
            instances = model([{"image": torch.as_tensor(image.astype("float32").transpose(2, 0, 1))}])[0]["instances"]
        shown = instances[instances.scores >= min_score].to("cpu")
        rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image
        tiles.append(Visualizer(rgb, MetadataCatalog.get(name), scale=2.0).draw_instance_predictions(shown).get_image())
    picture = Image.fromarray(np.concatenate(tiles, axis=1))
    labelled = Image.new("RGB", (picture.width + LABEL_WIDTH, picture.height), "white")
    labelled.paste(picture, (LABEL_WIDTH, 0))
    ImageDraw.Draw(labelled).text((LABEL_WIDTH // 2, picture.height // 2), norm, fill="black", anchor="mm",
                                  font=ImageFont.load_default(size=32))
    path = os.path.join(output_dir, f"detections_{norm}.png")
    labelled.save(path)
    return path

"""`make demo`: RetinaNet R18-FPN with BN, GN and FRN on the synthetic dataset (or on BCCD's real
images), on CPU: the norms trained and evaluated at the same time through tools/train_net.py, then
an AP table, a bar plot and a picture of each norm's detections."""
import concurrent.futures
import dataclasses
import math
import os
import shutil
import sys
import time

from ..model_zoo import get_config_file
from .config import load_cfg, load_run_cfg
from .plotting import figure, norm_color
from .processes import LOG_FILE, run_logged, tail_lines, thread_env
from .results import read_metrics, read_result

METRICS = ("AP", "AP50", "AP75", "APs", "APm")
LABEL_WIDTH = 96  # pixels of the strip naming the norm on the left of its detections picture
TILE_SIDE = 384  # pixels of an image's longer side in the picture (the synthetic 192 px at 2x)


def available_cores():
    """CPU cores this process may run on (the affinity mask, which containers restrict)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class DemoTask:
    """What a demo trains on: a shipped config per norm (frn_det.model_zoo; ``{}`` is the norm), the
    overrides every run gets, and the evaluation set's name for tables and plots."""

    config: str
    opts: tuple
    title: str


TASKS = {
    "synthetic": DemoTask("synthetic/retinanet_R18_FPN_{}.yaml", (), "synthetic val"),
    # real images: BCCD's test split only (its val split chooses nothing here)
    "bccd": DemoTask("bccd/retinanet_R18_FPN_{}.yaml", ("DATASETS.TEST", "('bccd_test',)"), "BCCD test (real images)"),
}


def config_file(norm, task=TASKS["synthetic"]):
    return get_config_file(task.config.format(norm))


def train_norms(norms, output_dir, resume, opts, train_net, poll_s=5.0, train_args=(), task=TASKS["synthetic"]):
    """Trains and evaluates every norm through ``train_net`` (tools/train_net.py) at the same time, the CPU cores shared
    out as intra-op threads (several small runs at once use 2 cores better than one after the other),
    with a progress bar per run; ``train_args`` go to train_net before the config overrides (e.g.
    ``--dataset NAME JSON IMAGE_ROOT`` to train on other data), ``task`` what they train on. Returns {norm: result}; runs that fail are reported as they end and
    then raised as one error naming each log. Without ``resume`` each run starts from an empty
    output_dir/<NORM>."""
    from tqdm import tqdm

    opts = [*task.opts, *opts]
    max_iter = {norm: load_cfg(config_file(norm, task), opts).SOLVER.MAX_ITER for norm in norms}  # bad opts fail here
    runs = {norm: os.path.join(output_dir, norm) for norm in norms}
    if not resume:
        for rdir in runs.values():
            shutil.rmtree(rdir, ignore_errors=True)
    env = thread_env(max(1, available_cores() // len(norms)))
    bars = {norm: tqdm(total=max_iter[norm], desc=f"{norm:>3} train", unit="it", position=i, dynamic_ncols=True)
            for i, norm in enumerate(norms)}
    failed, pending = {}, list(norms)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(norms)) as pool:
        done = {norm: pool.submit(run_logged, _command(train_net, config_file(norm, task), rdir, resume, train_args, opts),
                                  rdir, env) for norm, rdir in runs.items()}
        while pending:
            time.sleep(poll_s)
            for norm in list(pending):
                bar = bars[norm]
                bar.update(min(iterations_done(runs[norm]), bar.total) - bar.n)
                if not done[norm].done():
                    if bar.n == bar.total:
                        bar.set_description(f"{norm:>3} eval ")
                    continue
                pending.remove(norm)
                bar.close()
                rc = done[norm].result()[0]
                if rc != 0:  # said now, not after the other runs' remaining minutes
                    failed[norm] = (rc, os.path.join(runs[norm], LOG_FILE))
                    tqdm.write(f"{norm} failed (exit {rc}); its log: {failed[norm][1]}")
    if failed:
        ends = "\n".join(f"{norm} (exit {rc}): {log}, which ends:\n" + "\n".join(tail_lines(log, 30))
                         for norm, (rc, log) in failed.items())
        raise RuntimeError(f"{len(failed)} of {len(norms)} runs failed ({', '.join(failed)}):\n{ends}")
    return {norm: read_result(rdir) for norm, rdir in runs.items()}


def _command(train_net, config, run_dir, resume, train_args, opts):
    return [sys.executable, train_net, "--config-file", config, *(["--resume"] if resume else []),
            *train_args, "OUTPUT_DIR", run_dir, *opts]


def iterations_done(run_dir):
    """Training iterations done: the highest iteration detectron2 wrote to run_dir/metrics.json (its
    lines need not be in order: an evaluation's line may follow a later step's), 0 before any."""
    return max((int(r["iteration"]) + 1 for r in read_metrics(run_dir) if "iteration" in r), default=0)


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


def plot(results, path, task=TASKS["synthetic"]):
    """Box AP, AP50 and AP75 per norm as grouped bars."""
    with figure(path) as (_, axes):
        _bars(axes[0][0], results, task)


def _bars(ax, results, task):
    metrics = ("AP", "AP50", "AP75")
    width = 0.8 / len(results)
    for i, (norm, r) in enumerate(results.items()):
        vals = [r["results"]["bbox"][m] or 0.0 for m in metrics]
        bars = ax.bar([j + (i - (len(results) - 1) / 2) * width for j in range(len(metrics))], vals, width, label=norm,
                      color=norm_color(norm))
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    first = next(iter(results.values()))
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("box AP (%)")
    ax.set_title(f"RetinaNet R18-FPN, {task.title}, {first['ims_per_batch']} images/batch, "
                 f"{first['max_iter']} iterations", fontsize=9)
    ax.legend()


def draw_detections(norm, output_dir, num_images=4, min_score=0.3, task=TASKS["synthetic"]):
    """A picture of one norm's detections (score >= ``min_score``, detectron2's Visualizer) on the first
    ``num_images`` images of its test set, side by side after a strip naming the norm; returns its
    path (output_dir/detections_<NORM>.png)."""
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog, detection_utils
    from detectron2.data import transforms as T
    from detectron2.modeling import build_model
    from detectron2.utils.visualizer import Visualizer
    from PIL import Image, ImageDraw, ImageFont

    from .checkpoint import ShapeCheckingCheckpointer

    cfg = load_run_cfg(config_file(norm, task),
                       [*task.opts, "MODEL.WEIGHTS", os.path.join(output_dir, norm, "model_final.pth")])
    model = build_model(cfg).eval()
    ShapeCheckingCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    name = cfg.DATASETS.TEST[0]
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)  # as at test time
    tiles = []
    for record in DatasetCatalog.get(name)[:num_images]:
        image = detection_utils.read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        h, w = image.shape[:2]
        model_input = resize.get_transform(image).apply_image(image)
        with torch.no_grad():  # boxes come back in the image's own pixels (height, width)
            instances = model([{"image": torch.as_tensor(model_input.astype("float32").transpose(2, 0, 1)),
                                "height": h, "width": w}])[0]["instances"]
        shown = instances[instances.scores >= min_score].to("cpu")
        rgb = image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image
        tiles.append(Visualizer(rgb, MetadataCatalog.get(name), scale=TILE_SIDE / max(h, w))
                     .draw_instance_predictions(shown).get_image())
    picture = Image.fromarray(np.concatenate(tiles, axis=1))
    labelled = Image.new("RGB", (picture.width + LABEL_WIDTH, picture.height), "white")
    labelled.paste(picture, (LABEL_WIDTH, 0))
    ImageDraw.Draw(labelled).text((LABEL_WIDTH // 2, picture.height // 2), norm, fill="black", anchor="mm",
                                  font=ImageFont.load_default(size=32))
    path = os.path.join(output_dir, f"detections_{norm}.png")
    labelled.save(path)
    return path

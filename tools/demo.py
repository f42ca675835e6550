#!/usr/bin/env python
"""`make demo`: RetinaNet R18-FPN with BN, GN and FRN on the synthetic dataset, on CPU.

Generates the synthetic dataset (once; cached under the default root), then trains and evaluates
configs/synthetic/retinanet_R18_FPN_{BN,GN,FRN}.yaml one after the other through
tools/train_net.py (2 images per batch, the schedule in Base-RetinaNet-R18-FPN.yaml), prints an AP
table and writes output/demo/demo_ap.png. Each run keeps its detectron2 output directory
(log.txt, metrics.json, model_final.pth, frn_det_result.json) under output/demo/<NORM>/.

    python tools/demo.py                           # all three norms
    python tools/demo.py --norms FRN --resume      # one norm; finish an interrupted run
    python tools/demo.py -- SOLVER.MAX_ITER 100    # config overrides for every run
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from frn_det.data import SyntheticSpec, default_synthetic_root, generate  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "synthetic", "retinanet_R18_FPN_{}.yaml")
METRICS = ("AP", "AP50", "AP75", "APs", "APm")


def run_norm(norm, output_dir, resume, opts):
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", CONFIG.format(norm)]
    cmd += ["--resume"] if resume else []
    cmd += ["OUTPUT_DIR", os.path.join(output_dir, norm), *opts]
    print(f"\n==== {norm}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(output_dir, norm, "frn_det_result.json")) as f:
        return json.load(f)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norms", nargs="+", default=["BN", "GN", "FRN"], choices=["BN", "GN", "FRN"])
    parser.add_argument("--output-dir", default=os.path.join("output", "demo"))
    parser.add_argument("--resume", action="store_true", help="resume each run from its last checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides passed to every run, after --")
    args = parser.parse_args()
    opts = args.opts[1:] if args.opts[:1] == ["--"] else args.opts

    start = time.perf_counter()
    root = default_synthetic_root()
    print(f"Synthetic dataset under {root} (generated on first use, then reused)", flush=True)
    generate(SyntheticSpec(), root)
    results = {norm: run_norm(norm, args.output_dir, args.resume, opts) for norm in args.norms}

    summary = table(results)
    png = os.path.join(args.output_dir, "demo_ap.png")
    plot(results, png)
    with open(os.path.join(args.output_dir, "demo_ap.md"), "w") as f:
        f.write(summary + "\n")
    print(f"\nBox AP on frn_synthetic_val (COCO AP in %):\n{summary}")
    print(f"\nPlot: {png}\nTotal wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

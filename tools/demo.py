#!/usr/bin/env python
"""`make demo`: RetinaNet R18-FPN with BN, GN and FRN on the synthetic dataset, on CPU; with
`--dataset bccd` on BCCD's real microscope images (datasets/BCCD, shipped).

Generates the synthetic dataset (once; cached under the default root), then trains and evaluates
the shipped configs/synthetic/retinanet_R18_FPN_{BN,GN,FRN}.yaml (configs/bccd/... for BCCD,
evaluated on bccd_test) at the same time through tools/train_net.py,
the CPU cores shared out between the runs (2 images per batch, the schedule in
Base-RetinaNet-R18-FPN.yaml; a progress bar per run, its log in output/demo/<NORM>/), prints an AP
table and writes output/demo/demo_ap.png (AP per norm) and output/demo/detections_<NORM>.png
(detections with score >= 0.3 on 4 val images, detectron2's Visualizer). Each run keeps its
detectron2 output directory (log.txt, metrics.json, model_final.pth, frn_det_result.json) under
output/demo/<NORM>/.

    python tools/demo.py                           # all three norms
    python tools/demo.py --dataset bccd            # the same on real images
    python tools/demo.py --norms FRN --resume      # one norm; finish an interrupted run
    python tools/demo.py -- SOLVER.MAX_ITER 100    # config overrides for every run
"""
import argparse
import os
import time

from frn_det.data import SyntheticSpec, default_synthetic_root, generate
from frn_det.engine.demo import TASKS, draw_detections, plot, table, train_norms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norms", nargs="+", default=["BN", "GN", "FRN"], choices=["BN", "GN", "FRN"])
    parser.add_argument("--dataset", choices=sorted(TASKS), default="synthetic",
                        help="what to train on: the synthetic shapes (default) or BCCD's real images")
    parser.add_argument("--output-dir", help="default output/demo (output/demo_bccd for BCCD)")
    parser.add_argument("--resume", action="store_true", help="resume each run from its last checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides passed to every run, after --")
    args = parser.parse_args()
    opts = args.opts[1:] if args.opts[:1] == ["--"] else args.opts
    task = TASKS[args.dataset]
    out = args.output_dir or os.path.join("output", "demo" if args.dataset == "synthetic" else f"demo_{args.dataset}")

    start = time.perf_counter()
    if args.dataset == "synthetic":
        root = default_synthetic_root()
        print(f"Synthetic dataset under {root} (generated on first use, then reused)", flush=True)
        generate(SyntheticSpec(), root)
    results = train_norms(args.norms, out, args.resume, opts, task=task,
                          train_net=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_net.py"))

    summary = table(results)
    png = os.path.join(out, "demo_ap.png")
    plot(results, png, task)
    pictures = [draw_detections(norm, out, task=task) for norm in args.norms]
    with open(os.path.join(out, "demo_ap.md"), "w") as f:
        f.write(summary + "\n")
    print(f"\nBox AP on {task.title} (COCO AP in %):\n{summary}")
    print(f"\nPlot: {png}\nDetections: {', '.join(pictures)}\nTotal wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

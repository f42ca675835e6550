#!/usr/bin/env python
"""Seconds per training iteration (forward, backward, SGD step) of a stock detectron2 model with
BN, GN, FRN (custom op) and FRN (reference) in all norm places, and the ratio of each to BN.

The variants run interleaved (one iteration of each per round) so that load on a shared machine
hits them alike; the table gives the median over rounds after warm-up of the wall time and of the
process CPU time (on a loaded machine with --threads 1, CPU time is the steadier measure of cost).

    python tools/benchmark_step.py                      # RetinaNet R18-FPN, 2 images of 128x128, CPU
    python tools/benchmark_step.py --depth 50 --device cuda --size 512 SOLVER.IMS_PER_BATCH 4
"""
import argparse
import statistics
import time

import torch
from detectron2 import model_zoo
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import frn_det
from frn_det.engine import load_cfg, norm_everywhere
from frn_det.layers import ops

# name -> (norm name, MODEL.FRN.IMPL)
VARIANTS = {"BN": ("BN", None), "GN": ("GN", None), "FRN (op)": ("FRN", "op"), "FRN (reference)": ("FRN", "reference")}


def make_cfg(args, norm, impl):
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "MODEL.RESNETS.DEPTH", args.depth]
    if args.depth in (18, 34):
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
    opts += norm_everywhere(norm) + (["MODEL.FRN.IMPL", impl] if impl else [])
    return load_cfg(model_zoo.get_config_file(args.config), opts + args.opts)


def make_batch(n, size, device):
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.1, 0.1, 0.55, 0.7], [0.4, 0.3, 0.95, 0.9]]) * size
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = True
    inst = Instances((size, size), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([1, 7]), gt_masks=BitMasks(masks))
    return [{"image": (torch.rand(3, size, size, generator=g) * 255).to(device), "instances": inst.to(device)}
            for _ in range(n)]


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="COCO-Detection/retinanet_R_50_FPN_1x.yaml", help="model-zoo config")
    parser.add_argument("--depth", type=int, default=18, help="MODEL.RESNETS.DEPTH")
    parser.add_argument("--images", type=int, default=2, help="images per iteration")
    parser.add_argument("--size", type=int, default=128, help="image height and width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    skipped, steps = {}, {}
    for name in args.variants:
        norm, impl = VARIANTS[name]
        if impl == "op" and not ops.is_available():
            skipped[name] = f"frn_det._C not built ({ops.load_error()})"
            continue
        cfg = make_cfg(args, norm, impl)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        steps[name] = (model, frn_det.build_optimizer(cfg, model))

    batch = make_batch(args.images, args.size, args.device)
    times = {name: ([], []) for name in steps}  # wall, process CPU
    with EventStorage(0):
        for i in range(args.warmup + args.iters):
            for name, (model, optimizer) in steps.items():
                synchronize(args.device)
                wall, cpu = time.perf_counter(), time.process_time()
                loss = sum(model(batch).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                synchronize(args.device)
                if i >= args.warmup:
                    times[name][0].append(time.perf_counter() - wall)
                    times[name][1].append(time.process_time() - cpu)

    print(f"{args.config} R{args.depth}, {args.images} images of {args.size}x{args.size}, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.iters} iterations after {args.warmup} warm-up")
    median = {name: [statistics.median(t) for t in ts] for name, ts in times.items()}
    print(f"{'variant':<17}{'wall s':>9}{'x BN':>7}{'CPU s':>9}{'x BN':>7}")
    for name in args.variants:
        if name in skipped:
            print(f"{name:<17}{'-':>9}{'-':>7}{'-':>9}{'-':>7}  skipped: {skipped[name]}")
            continue
        row = f"{name:<17}"
        for k in (0, 1):
            base = median["BN"][k] if "BN" in median else None
            row += f"{median[name][k]:9.3f}" + (f"{median[name][k] / base:7.2f}" if base else f"{'-':>7}")
        print(row)


if __name__ == "__main__":
    main()

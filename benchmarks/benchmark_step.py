"""Seconds per training iteration (forward, backward, SGD step) of a stock detectron2 model with
BN, GN, FRN (custom op) and FRN (reference) in all norm places, and the ratio of each to BN.

The variants run interleaved (one iteration of each per round) so that load on a shared machine
hits them alike; the table gives the median over rounds after warm-up of the wall time and of the
process CPU time (on a loaded machine with --threads 1, CPU time is the steadier measure of cost).

    python -m benchmarks.benchmark_step                      # RetinaNet R18-FPN, 2 images of 128x128, CPU
    python -m benchmarks.benchmark_step --depth 50 --device cuda --size 512 SOLVER.IMS_PER_BATCH 4
"""
import argparse

import torch

from .step import VARIANTS, time_steps


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
    median, skipped = time_steps(args.variants, args.config, args.depth, args.images, args.size, args.device,
                                 args.warmup, args.iters, args.opts)
    print(f"{args.config} R{args.depth}, {args.images} images of {args.size}x{args.size}, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.iters} iterations after {args.warmup} warm-up")
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

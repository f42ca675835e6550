"""Time per training iteration (forward, backward, SGD step, through detectron2's SimpleTrainer or
AMPTrainer) of stock detectron2 models with BN, GN, FRN (custom op) and FRN (reference) in all norm
places, and the ratio of each to BN at the same AMP setting; on CUDA also the memory a step takes.

The variants run interleaved (benchmarks/step.py); the table gives the median over rounds after
warm-up of the wall time with its range, the median process CPU time (on a loaded machine with
--threads 1 the steadier measure of cost) and, on CUDA, the largest step memory.

    python -m benchmarks.benchmark_step                      # RetinaNet R18-FPN, 2 images of 128x128, CPU
    python -m benchmarks.benchmark_step --models retinanet mask_rcnn --depth 50 --device cuda \\
        --size 800 1333 --amp off on --json step.json        # the GPU check's run (tools/gpu_check.sh)
"""
import argparse
import json

import torch

from .step import DEFAULT_VARIANTS, MODELS, VARIANTS, format_table, time_steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["retinanet"],
                        help=f"config files, model-zoo configs, or the short names {', '.join(MODELS)}")
    parser.add_argument("--depth", type=int, default=18, help="MODEL.RESNETS.DEPTH")
    parser.add_argument("--images", type=int, default=2, help="images per iteration")
    parser.add_argument("--size", type=int, nargs="+", default=[128], metavar="PIXELS",
                        help="image height [and width]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", nargs="+", choices=["off", "on"], default=["off"],
                        help="AMP settings to time (on: AMPTrainer, CUDA only)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--json", help="also write every result here, for docs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides")
    args = parser.parse_args(argv)
    if len(args.size) > 2:
        parser.error("--size takes a height and at most one width")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = (args.size[0], args.size[-1])
    amp = [a == "on" for a in args.amp]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    report = []
    for model in args.models:
        results, skipped = time_steps(args.variants, model, args.depth, args.images, size, args.device,
                                      args.warmup, args.iters, args.opts, amp)
        print(f"\n{MODELS.get(model, model)} R{args.depth}, {args.images} images of {size[0]}x{size[1]}, "
              f"{device_name}, median of {args.iters} iterations after {args.warmup} warm-up")
        print(format_table(results, skipped, args.variants, amp), flush=True)
        report += [{"model": model, "depth": args.depth, "images": args.images, "size": size, "device": device_name,
                    "variant": name, "amp": use_amp, **results.get((name, use_amp), {}),
                    "skipped": skipped.get((name, use_amp))} for name in args.variants for use_amp in amp]
        if args.json:  # rewritten after each model, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

"""Benchmark the fused FRN op against the alternatives on R50-FPN feature shapes.

What is measured (time, effective bandwidth, ratio to the op; the methods compared) is described
in benchmarks/op.py, which holds the logic.

Examples::

    python -m benchmarks.benchmark_frn                       # CPU (and CUDA when present), default shapes
    python -m benchmarks.benchmark_frn --device cuda --dtype float32 float16 bfloat16 --layout both \\
        --shapes all --copy-bandwidth               # what tools/gpu_check.sh runs
    python -m benchmarks.benchmark_frn --shapes target --iters 20
    python -m benchmarks.benchmark_frn --shapes 2x256x100x168,512x256x7x7 --layout channels_last
    python -m benchmarks.benchmark_frn --device cuda --shapes fpn_p2,fpn_p6 --profile   # where the time goes
    python -m benchmarks.benchmark_frn --device cpu --shapes target --memory-floor --threads 2 1 --iters 30
    python -m benchmarks.benchmark_frn --device cuda --dtype float16 bfloat16 --amp --memory-floor --kernel-time
    python -m benchmarks.benchmark_frn --device cuda --memory-floor --kernel-time --kernels default resident
    python -m benchmarks.benchmark_frn --device cpu --shapes target,box_head --baseline "centred op" \
        --methods "centred op" "centred reference" InstanceNorm2d+TLU BatchNorm2d+ReLU op   # the centred variant
    python -m benchmarks.benchmark_frn --device cpu --shapes target --memory-floor --centered --threads 2
    python -m benchmarks.benchmark_frn --device cpu --shapes target,box_head --memory-floor --kernels default baseline

Prints markdown tables; no pass/fail thresholds here.
"""
import argparse
import sys

import torch

from frn_det.layers import ops

from .op import (DTYPES, KERNEL_SETTINGS, SHAPES, copy_bandwidth, format_floor_table, format_table, make_methods,
                 memory_floor, parse_shapes, profile, run)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all: CPU, plus CUDA when available (default)")
    parser.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=["float32"])
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated names ({', '.join(SHAPES)}), NxCxHxW, or 'all'; "
                             "default: a per-device subset")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--layout", choices=["contiguous", "channels_last", "both"], default="contiguous")
    parser.add_argument("--threads", type=int, nargs="+", default=[None],
                        help="CPU threads; several: the whole benchmark once per count (default: torch's default)")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="min is the better estimate on a machine shared with other jobs")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="the methods to time (default: all; 'compiled reference' costs a compilation per shape)")
    parser.add_argument("--baseline", default="op",
                        help="the method the ratio column divides by (default: op), timed even when --methods leaves it out")
    parser.add_argument("--kernels", nargs="+", choices=list(KERNEL_SETTINGS), default=["default"],
                        help="the op's kernel settings, each timed as its own method ('op', 'op (resident)') and in "
                             "the memory floor; resident: CUDA's opt-in resident planes (ops.cuda_resident_planes); "
                             "baseline: the CPU kernels' baseline build instead of their AVX2 one (ops.cpu_avx2)")
    switches = {
        "--copy-bandwidth": "also measure a device copy and give bandwidth as %% of it",
        "--profile": "instead of timing every method: torch.profiler on the op's and BatchNorm2d+ReLU's "
                     "forward+backward (wall time against kernel time, top events)",
        "--memory-floor": "instead of comparing methods: the op against a copy / an add of the same tensors "
                          "(the memory traffic it needs), as time ratios",
        "--amp": "as AMP trains: fp32 parameters, x in --dtype (float16 / bfloat16), every method under "
                 "torch.autocast",
        "--kernel-time": "CUDA: time a CUDA graph replay of 20 calls (the device's work, without the host's "
                         "per-call cost) instead of one call",
        "--centered": "with --memory-floor: the centred op (frn_centered, CPU kernels only) instead of the paper's",
    }
    for flag, text in switches.items():
        parser.add_argument(flag, action="store_true", help=text)
    args = parser.parse_args(argv)
    if args.amp and set(args.dtype) - {"float16", "bfloat16"}:
        parser.error("--amp: --dtype must be float16 and/or bfloat16 (the activations' dtype under autocast)")
    if args.kernel_time and (args.device != "cuda" or args.profile):
        parser.error("--kernel-time: needs --device cuda (CUDA graphs) and is a timing mode, not --profile's")
    if "resident" in args.kernels and args.device != "cuda":
        parser.error("--kernels resident: a setting of the CUDA kernels; needs --device cuda")
    if "baseline" in args.kernels and args.device != "cpu":
        parser.error("--kernels baseline: a setting of the CPU kernels; needs --device cpu")
    known = set(make_methods(8)) | {"op", "centred op"}  # methods even where frn_det._C is not built
    if args.methods and set(args.methods) - known:
        parser.error(f"--methods: unknown {sorted(set(args.methods) - known)}; known: {sorted(known)}")
    if args.baseline not in known:
        parser.error(f"--baseline: unknown {args.baseline!r}; known: {sorted(known)}")
    if args.centered and (not args.memory_floor or args.device != "cpu"):
        parser.error("--centered: a setting of --memory-floor, on --device cpu (the centred op has CPU kernels only)")

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("--device cuda: no CUDA device available")
        devices.remove("cuda")
    if not ops.is_available():
        if args.memory_floor:
            raise SystemExit(f"--memory-floor: frn_det._C is not built ({ops.load_error()})")
        print(f"note: frn_det._C is not built ({ops.load_error()}); the op is skipped", file=sys.stderr)
    layouts = {"contiguous": [False], "channels_last": [True], "both": [False, True]}[args.layout]
    for threads in args.threads:
        if threads is not None:
            torch.set_num_threads(threads)
        for device in devices:
            try:
                shapes = parse_shapes(args.shapes, device)
            except ValueError as e:
                raise SystemExit(str(e)) from None
            copy_gbs = copy_bandwidth(device) if args.copy_bandwidth and not (args.profile or args.memory_floor) else None
            for dtype_name in args.dtype:
                dtype = DTYPES[dtype_name]
                for channels_last in layouts:
                    if args.profile:
                        print("\n" + profile(device, dtype, shapes, args.iters, channels_last, amp=args.amp))
                    elif args.memory_floor:
                        rows = memory_floor(device, dtype, shapes, args.iters, channels_last, args.stat, args.amp,
                                            args.kernel_time, args.kernels, args.centered)
                        print("\n" + format_floor_table(rows, device, dtype, channels_last, args.iters, args.stat,
                                                        args.amp, args.kernel_time, args.centered))
                    else:
                        rows = run(device, dtype, shapes, args.iters, channels_last, args.stat, args.methods,
                                   args.amp, args.kernel_time, args.kernels, args.baseline)
                        print("\n" + format_table(rows, device, dtype, channels_last, args.iters, args.stat, copy_gbs,
                                                  args.amp, args.kernel_time, args.baseline))


if __name__ == "__main__":
    main()

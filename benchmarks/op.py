"""Benchmark of the fused FRN op against the alternatives on R50-FPN feature shapes.

For every shape and method: forward and forward+backward time (median, or min, over --iters runs
after warm-up; the methods take turns in every round), effective bandwidth and the time ratio to the op (> 1: the op is faster). Effective
bandwidth counts the minimum traffic of a fused norm: forward reads x and writes the output
(2 tensors), forward+backward adds reading grad_out and x and writing grad_x (5 tensors).

Methods: the op (``frn(..., impl="op")``), ``frn_reference`` eager, ``torch.compile(frn_reference)``,
timm's ``FilterResponseNormTlu2d`` (when timm is installed), ``BatchNorm2d + ReLU`` (training mode)
and ``GroupNorm(32) + ReLU``; the centred variant (``centered=True``) in the fused op ("centred op",
CPU kernels only), in the reference ("centred reference": torch's GroupNorm kernel with C groups and
a TLU, the path before the op had it) and as ``InstanceNorm2d(affine) + TLU``. FRN methods run FRN +
TLU with random parameters. Ratios are to the op, or to the method named as ``baseline``.

:func:`profile` shows where a method's forward+backward time goes (torch.profiler): its kernels, or
the host calls around them (a method can take far longer than its kernels on small maps).

:func:`memory_floor` times the op (or, ``centered``, the centred op) against the memory traffic it
needs, in the same run.

Two settings apply to both: ``amp`` keeps the parameters in fp32 while x has the benchmark's dtype,
and runs every method under ``torch.autocast`` (how AMP training calls a norm: BatchNorm takes fp16
input with fp32 parameters, autocast runs GroupNorm in fp32); ``kernel_time`` (CUDA) times a CUDA
graph replay of 20 calls instead of one call, so that the host's per-call cost is out of the time.
``kernels`` names the op's kernel settings to time side by side (:data:`KERNEL_SETTINGS`: the
default kernels, CUDA's opt-in resident planes, and the CPU kernels' baseline build instead of
their AVX2 one), each entered outside the timed region.

Used by benchmarks/benchmark_frn.py and tools/gpu_check.sh; needs torch only. No pass/fail thresholds.
"""
import contextlib
import statistics
import sys
import time

import torch
from torch import nn

from frn_det.layers import ops
from frn_det.layers.filter_response_norm import TLU, frn, frn_reference

# Feature shapes of an R50-FPN detector, batch 2, 800x1344 padded input.
SHAPES = {
    "stem": (2, 64, 400, 672),
    "res2": (2, 256, 200, 336),
    "res3": (2, 512, 100, 168),
    "res4": (2, 1024, 50, 84),
    "res5": (2, 2048, 25, 42),
    "fpn_p2": (2, 256, 200, 336),
    "target": (2, 256, 100, 168),  # FPN P3 / the target shape
    "fpn_p4": (2, 256, 50, 84),
    "fpn_p6": (2, 256, 13, 21),
    "box_head": (512, 256, 7, 7),  # conv box head, 512 ROIs
    "mask_head": (128, 256, 14, 14),
}
DEFAULT_SHAPES = {
    "cpu": ["target", "res4", "fpn_p4", "fpn_p6", "box_head", "mask_head"],
    "cuda": list(SHAPES),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# The op's kernel settings: name -> a context manager factory the op's calls run under.
KERNEL_SETTINGS = {"default": contextlib.nullcontext, "resident": ops.cuda_resident_planes,
                   "baseline": lambda: ops.cpu_avx2(False)}


def op_name(kernels):
    """The method name of the op under a kernel setting: "op", "op (resident)"."""
    return "op" if kernels == "default" else f"op ({kernels})"


def parse_shapes(spec, device):
    if spec is None:
        names = DEFAULT_SHAPES[device]
    elif spec == "all":
        names = list(SHAPES)
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    shapes = []
    for name in names:
        if name in SHAPES:
            shapes.append((name, SHAPES[name]))
        else:
            try:
                dims = tuple(int(d) for d in name.lower().split("x"))
            except ValueError:
                raise ValueError(f"unknown shape {name!r}: use one of {sorted(SHAPES)} or NxCxHxW") from None
            if len(dims) != 4:
                raise ValueError(f"shape {name!r} must have 4 dimensions (NxCxHxW)")
            shapes.append((name, dims))
    return shapes


class FRNFunctional(nn.Module):
    """FRN + TLU parameters around a functional implementation."""

    def __init__(self, C, fn):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.rand(C) + 0.5)
        self.bias = nn.Parameter(torch.randn(C) * 0.1)
        self.tau = nn.Parameter(torch.randn(C) * 0.1)

    def forward(self, x):
        return self.fn(x, self.weight, self.bias, self.tau, 1e-6, None)


def make_methods(C):
    """name -> factory returning a module (None when unavailable, with the reason)."""
    methods = {}
    if ops.is_available():
        methods["op"] = lambda: FRNFunctional(C, lambda *a: frn(*a, impl="op"))
    methods["reference"] = lambda: FRNFunctional(C, frn_reference)
    methods["compiled reference"] = lambda: FRNFunctional(C, torch.compile(frn_reference, dynamic=False))
    try:
        from timm.layers import FilterResponseNormTlu2d

        methods["timm FRN+TLU"] = lambda: FilterResponseNormTlu2d(C)
    except ImportError:
        pass
    methods["BatchNorm2d+ReLU"] = lambda: nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())
    methods["GroupNorm32+ReLU"] = lambda: nn.Sequential(nn.GroupNorm(32, C), nn.ReLU())
    if ops.is_available():
        methods["centred op"] = lambda: FRNFunctional(C, lambda *a: frn(*a, impl="op", centered=True))
    methods["centred reference"] = lambda: FRNFunctional(C, lambda *a: frn_reference(*a, centered=True))
    # eps as FRNFunctional's, so that the three centred methods compute the same function
    methods["InstanceNorm2d+TLU"] = lambda: nn.Sequential(nn.InstanceNorm2d(C, eps=1e-6, affine=True), _random_tau(TLU(C)))
    return methods


def _random_tau(tlu):
    with torch.no_grad():
        tlu.tau.normal_(0, 0.1)
    return tlu


def _inputs(shape, device, dtype, channels_last):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    return x, torch.randn_like(x)


KERNEL_TIME_REPS = 20  # calls per CUDA graph in kernel-time mode


def time_once(fn, device):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def graph_timer(fn, reps=KERNEL_TIME_REPS):
    """A function that times ``fn``'s device work alone: ``reps`` calls captured into one CUDA graph,
    each timing one replay divided by ``reps``."""
    side = torch.cuda.Stream()  # capture needs its warm-up on a side stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return lambda: time_once(graph.replay, "cuda") / reps


def make_timer(fn, device, kernel_time, setting=contextlib.nullcontext):
    """A function that returns one timing of ``fn`` in seconds: a call, or (kernel_time) its device
    work; ``fn`` runs under ``setting()`` (a CUDA graph: its capture), entered outside the timing."""
    if kernel_time:
        if device != "cuda":
            raise ValueError("kernel time is CUDA's (a CUDA graph replay): on the CPU, time per call")
        with setting():
            return graph_timer(fn)

    def timer():
        with setting():
            return time_once(fn, device)

    return timer


def _warm_up(fns, setting):
    with setting():
        for fn in fns * 2:  # warm-up (and compilation)
            fn()


def make_closures(module, x, grad_out, amp=False):
    """fwd and fwd_bwd of ``module`` on x; with ``amp`` under torch.autocast in x's dtype."""
    params = [p for p in module.parameters() if p.requires_grad]
    autocast = lambda: torch.autocast(x.device.type, dtype=x.dtype, enabled=amp)  # noqa: E731

    def fwd():
        with torch.no_grad(), autocast():
            module(x)

    grads = {grad_out.dtype: grad_out}  # grad_out in the output's dtype (autocast runs GroupNorm in fp32)

    def fwd_bwd():
        # autograd.grad instead of .backward(): no gradient accumulation in the timing.
        with autocast():
            out = module(x)
        if out.dtype not in grads:
            grads[out.dtype] = grad_out.to(out.dtype)
        torch.autograd.grad(out, [x, *params], grads[out.dtype])

    return fwd, fwd_bwd


def _check_amp(amp, dtype):
    if amp and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"amp: the activations' dtype must be float16 or bfloat16, not {dtype}")


def copy_bandwidth(device, nbytes=256 << 20, iters=10):
    """GB/s of a device-to-device copy (bytes read + written), the best of ``iters``: the ceiling
    that a memory-bound kernel like FRN is measured against, in the same run."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    return 2 * nbytes / min(time_once(lambda: dst.copy_(src), device) for _ in range(iters)) / 1e9


def _variants(methods, kernels):
    """(method name, factory, setting) of :func:`make_methods`, the op once per kernel setting."""
    for method, factory in methods.items():
        if method == "op":
            for k in kernels:
                yield op_name(k), factory, KERNEL_SETTINGS[k]
        else:
            yield method, factory, contextlib.nullcontext


def run(device, dtype, shapes, iters, channels_last, stat, methods=None, amp=False, kernel_time=False,
        kernels=("default",), baseline="op"):
    """Rows of :func:`format_table`: every method of :func:`make_methods` (or those named in
    ``methods``, "op" standing for the op under every setting of ``kernels``) on each shape, with
    its time as a ratio to ``baseline``'s (empty where the baseline did not run)."""
    _check_amp(amp, dtype)
    reduce = statistics.median if stat == "median" else min
    rows = []
    for name, shape in shapes:
        torch._dynamo.reset()  # compiled code is cached per function: keep each shape's entries apart
        x, grad_out = _inputs(shape, device, dtype, channels_last)
        nbytes = x.numel() * x.element_size()
        closures, errors = {}, {}
        for method, factory, setting in _variants(make_methods(shape[1]), kernels):
            if methods is not None and method.partition(" (")[0] not in methods and method != baseline:
                continue
            try:
                module = factory().to(device=device, dtype=None if amp else dtype).train()
                fns = make_closures(module, x, grad_out, amp)
                _warm_up(fns, setting)
                closures[method] = [make_timer(fn, device, kernel_time, setting) for fn in fns]
            except Exception as e:  # report, keep benchmarking the other methods
                errors[method] = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
        # Methods take turns in every round, so that load from other processes hits them alike.
        times = {m: ([], []) for m in closures}
        for _ in range(iters):
            for kind in (0, 1):
                for method, timers in closures.items():
                    times[method][kind].append(timers[kind]())
        base = (reduce(times[baseline][0]), reduce(times[baseline][1])) if baseline in times else None
        for method in list(closures) + list(errors):
            if method in errors:
                rows.append((name, shape, method, errors[method]))
                continue
            fwd, fb = reduce(times[method][0]), reduce(times[method][1])
            ratio = f"{fwd / base[0]:.2f} / {fb / base[1]:.2f}" if base else ""
            rows.append((name, shape, method, fwd * 1e3, 2 * nbytes / fwd / 1e9, fb * 1e3, 5 * nbytes / fb / 1e9, ratio))
        print(f"  done {name} {tuple(shape)}", file=sys.stderr, flush=True)
    return rows


def memory_floor(device, dtype, shapes, iters, channels_last, stat, amp=False, kernel_time=False,
                 kernels=("default",), centered=False):
    """The op's (``centered``: the centred op's) forward, backward and forward+backward against the
    time of the memory traffic they need, timed in the same run (every closure once per round,
    rounds interleaved).

    Forward reads x and writes the output: its floor is a copy of x. Backward reads x and grad_out
    and writes grad_x (its per-plane sums need no more traffic when taken in the same pass): its
    floor is x + grad_out. Each floor runs into a preallocated output (the memory's own speed) and
    into a fresh one, as the op writes (allocation and first-touch page faults included). The op
    is called through the dispatcher without autograd, TLU on, grad_x computed, under each kernel
    setting of ``kernels``.
    Rows: (name, shape, pass, kernel setting, op s, floor s, fresh-output floor s)."""
    _check_amp(amp, dtype)
    reduce = statistics.median if stat == "median" else min
    frn_op, backward_op = _op_pair(centered)
    rows = []
    for name, shape in shapes:
        x, grad_out = _inputs(shape, device, dtype, channels_last)
        x = x.detach()
        params = FRNFunctional(shape[1], None).to(device=device, dtype=None if amp else dtype)
        w, b, t = (p.detach() for p in (params.weight, params.bias, params.tau))
        stats = frn_op(x, w, b, t, 1e-6, None)[1:]  # rstd, or mean and rstd
        out, grad_x = torch.empty_like(x), torch.empty_like(x)
        passes = {
            "forward": (lambda: frn_op(x, w, b, t, 1e-6, None), lambda: out.copy_(x), lambda: x.clone()),
            "backward": (lambda: backward_op(grad_out, x, w, b, t, *stats, None, True),
                         lambda: torch.add(x, grad_out, out=grad_x), lambda: torch.add(x, grad_out)),
        }
        passes["forward+backward"] = tuple(
            (lambda f=f, g=g: (f(), g())) for f, g in zip(passes["forward"], passes["backward"]))
        # (pass, setting name, fn, setting): the op under each setting, then the two floors
        closures = [(kind, k, fns[0], KERNEL_SETTINGS[k]) for kind, fns in passes.items() for k in kernels]
        closures += [(kind, floor, fn, contextlib.nullcontext)
                     for kind, fns in passes.items() for floor, fn in zip(("floor", "fresh"), fns[1:])]
        for _, _, fn, setting in closures:
            _warm_up([fn], setting)
        timers = [make_timer(fn, device, kernel_time, setting) for _, _, fn, setting in closures]
        times = [[] for _ in closures]
        for _ in range(iters):
            for i, timer in enumerate(timers):
                times[i].append(timer())
        t = {(kind, what): reduce(times[i]) for i, (kind, what, _, _) in enumerate(closures)}
        for kind in passes:
            for k in kernels:
                rows.append((name, shape, kind, k, t[kind, k], t[kind, "floor"], t[kind, "fresh"]))
        print(f"  done {name} {tuple(shape)}", file=sys.stderr, flush=True)
    return rows


def _op_pair(centered):
    """The forward and backward ops of the paper's FRN or (``centered``) of the centred variant."""
    if centered:
        return torch.ops.frn_det.frn_centered.default, torch.ops.frn_det.frn_centered_backward.default
    return torch.ops.frn_det.frn.default, torch.ops.frn_det.frn_backward.default


def format_floor_table(rows, device, dtype, channels_last, iters, stat, amp=False, kernel_time=False,
                       centered=False):
    """The markdown table of :func:`memory_floor`'s rows."""
    what = "Centred FRN op (frn_centered)" if centered else "FRN op"
    lines = [f"### {what} against its memory floor: {_setting(device, dtype, channels_last, amp, kernel_time)}, "
             f"{stat} of {iters} interleaved runs", "",
             "Floor: forward = copy of x, backward = x + grad_out; into a preallocated output, and into a fresh "
             "one (as the op writes). % of floor: floor time / op time.", "",
             "| shape | N,C,H,W | pass | kernels | op ms | floor ms | op / floor | % of floor | fresh-output floor ms "
             "| op / fresh floor |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, shape, kind, kernels, op_s, floor_s, fresh_s in rows:
        dims = "x".join(str(d) for d in shape)
        lines.append(f"| {name} | {dims} | {kind} | {kernels} | {op_s * 1e3:.3f} | {floor_s * 1e3:.3f} | "
                     f"{op_s / floor_s:.2f} | {100 * floor_s / op_s:.0f} | {fresh_s * 1e3:.3f} | {op_s / fresh_s:.2f} |")
    return "\n".join(lines) + "\n"


def profile(device, dtype, shapes, iters, channels_last=False, methods=("op", "BatchNorm2d+ReLU"), row_limit=8,
            amp=False):
    """Markdown: for each shape and method, the wall time of one forward+backward against the time in
    device kernels (CUDA), and torch.profiler's top events by self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _check_amp(amp, dtype)
    on_cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    sections = []
    for name, shape in shapes:
        x, grad_out = _inputs(shape, device, dtype, channels_last)
        factories = make_methods(shape[1])
        dims = "x".join(map(str, shape))
        for method in methods:
            if method not in factories:
                sections.append(f"#### {name} {dims}, {method}: unavailable\n")
                continue
            module = factories[method]().to(device=device, dtype=None if amp else dtype).train()
            _, fwd_bwd = make_closures(module, x, grad_out, amp)
            for _ in range(3):
                fwd_bwd()
            sync()
            with torch_profile(activities=activities) as prof:
                start = time.perf_counter()
                for _ in range(iters):
                    fwd_bwd()
                sync()
                wall_ms = (time.perf_counter() - start) / iters * 1e3
            head = f"#### {name} {dims}, {method}: {wall_ms:.3f} ms per forward+backward (wall, profiled)"
            if on_cuda:
                # kernels, memcpys and memsets; annotations span kernels and would count them twice
                events = [e for e in prof.events()
                          if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
                device_ms = sum(e.device_time_total for e in events) / iters / 1e3
                head += f", {device_ms:.3f} ms in {len(events) / iters:.0f} device events (kernels, copies)"
            table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
            sections.append(f"{head}\n\n```\n{table.strip()}\n```\n")
        print(f"  profiled {name} {tuple(shape)}", file=sys.stderr, flush=True)
    return f"### FRN profile: {_setting(device, dtype, channels_last, amp)}, {iters} iterations\n\n" + "\n".join(sections)


def _setting(device, dtype, channels_last, amp=False, kernel_time=False):
    """The "<device>, <dtype>, <layout>[, timing]" part of a section title."""
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    layout = "channels_last" if channels_last else "contiguous"
    dtypes = str(dtype).replace("torch.", "") + (" with fp32 parameters (AMP: autocast)" if amp else "")
    timing = f", kernel time (CUDA graphs of {KERNEL_TIME_REPS} calls)" if kernel_time else ""
    return f"{dev}, {dtypes}, {layout}{timing}"


def format_table(rows, device, dtype, channels_last, iters, stat, copy_gbs=None, amp=False, kernel_time=False,
                 baseline="op"):
    """The markdown table of :func:`run`'s rows (their ratios to ``baseline``); with ``copy_gbs``,
    bandwidth also as % of the copy."""
    lines = [f"### FRN benchmark: {_setting(device, dtype, channels_last, amp, kernel_time)}, {stat} of {iters} "
             "interleaved runs",
             ""]
    if copy_gbs:
        lines += [f"Device copy in the same run: {copy_gbs:.0f} GB/s (read + written); % columns are of that.", ""]
    pct = " | fwd % | fwd+bwd %" if copy_gbs else ""
    lines += [f"| shape | N,C,H,W | method | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s{pct} | time / {baseline} (fwd / fwd+bwd) |",
              "|---|---|---|---:|---:|---:|---:|" + ("---:|---:|" if copy_gbs else "") + "---:|"]
    for row in rows:
        name, shape, method = row[:3]
        dims = "x".join(str(d) for d in shape)
        if len(row) == 4:
            lines.append(f"| {name} | {dims} | {method} | n/a ({row[3]}) | | | |" + (" | |" if copy_gbs else "") + " |")
            continue
        fwd, fgb, fb, fbgb, ratio = row[3:]
        extra = f" | {100 * fgb / copy_gbs:.0f} | {100 * fbgb / copy_gbs:.0f}" if copy_gbs else ""
        lines.append(f"| {name} | {dims} | {method} | {fwd:.2f} | {fgb:.1f} | {fb:.2f} | {fbgb:.1f}{extra} | {ratio} |")
    return "\n".join(lines) + "\n"

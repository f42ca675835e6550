"""Training iterations of stock detectron2 models with each norm variant in all norm places
(benchmarks/benchmark_step.py), through detectron2's own trainers: ``SimpleTrainer``, or
``AMPTrainer`` (autocast fp16 and a GradScaler, as ``SOLVER.AMP.ENABLED`` trains) for AMP.

Each (variant, AMP) pair is one trainer over an endless repeat of one batch. They run interleaved (one
iteration of each per round) so that load on a shared machine, or a GPU's clocks, hit them alike;
after the warm-up rounds each iteration's wall time (the device synchronised around it), process CPU
time and, on CUDA, the peak memory it allocated above what was allocated before it (activations and
workspaces; the models' parameters and optimizer state are resident throughout) are kept."""
import contextlib
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
from detectron2 import model_zoo
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from frn_det.engine.config import load_cfg, norm_everywhere
from frn_det.layers import ops
from frn_det.modeling import build_optimizer

# name -> (norm name, MODEL.FRN.IMPL, more config lines); the defaults leave out the centred variant
# and the op under CUDA's opt-in resident planes (ops.cuda_resident_planes, held through each iteration)
VARIANTS = {"BN": ("BN", None, ()), "GN": ("GN", None, ()), "FRN (op)": ("FRN", "op", ()),
            "FRN (op, resident)": ("FRN", "op", ()), "FRN (reference)": ("FRN", "reference", ()),
            "FRN centred (op)": ("FRN", "op", ("MODEL.FRN.CENTERED", True)),
            "FRN centred (reference)": ("FRN", "reference", ("MODEL.FRN.CENTERED", True))}
RESIDENT_VARIANTS = {"FRN (op, resident)"}
CPU_ONLY_VARIANTS = {"FRN centred (op)"}  # the centred op has CPU kernels only
DEFAULT_VARIANTS = ["BN", "GN", "FRN (op)", "FRN (reference)"]
# short names of the detectron2 model-zoo configs the benchmark is usually run on
MODELS = {"retinanet": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
          "mask_rcnn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"}


def make_cfg(config, depth, device, norm, impl, opts=()):
    """``config`` (a config file, a model-zoo config or a short name of MODELS) from scratch, ``norm``
    in every norm place."""
    overrides = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "MODEL.RESNETS.DEPTH", depth]
    if depth in (18, 34):
        overrides += ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
    overrides += norm_everywhere(norm) + (["MODEL.FRN.IMPL", impl] if impl else [])
    path = config if os.path.isfile(config) else model_zoo.get_config_file(MODELS.get(config, config))
    return load_cfg(path, overrides + list(opts))


def make_batch(n, height, width):
    """``n`` images of height x width as a detectron2 loader yields them (uint8 CHW on the CPU, the
    model copies them to its device), each with two boxes, classes and masks."""
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.1, 0.1, 0.55, 0.7], [0.4, 0.3, 0.95, 0.9]]) * torch.tensor([width, height] * 2)
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = True
    inst = Instances((height, width), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([1, 3]), gt_masks=BitMasks(masks))
    return [{"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g), "instances": inst,
             "height": height, "width": width} for _ in range(n)]


@dataclass
class StepTimes:
    """One (variant, AMP) trainer's timed iterations."""
    wall: list = field(default_factory=list)  # s
    cpu: list = field(default_factory=list)  # s of process CPU time
    memory: list = field(default_factory=list)  # bytes above the step's start, CUDA only

    def summary(self):
        """{median_s, min_s, max_s, cpu_s, peak_mb}: medians of wall and CPU time, the wall time's
        range, and the largest step memory (None off CUDA)."""
        return {"median_s": statistics.median(self.wall), "min_s": min(self.wall), "max_s": max(self.wall),
                "cpu_s": statistics.median(self.cpu), "peak_mb": max(self.memory) / 2**20 if self.memory else None}


def _why_not(name, amp, device):
    if VARIANTS[name][1] == "op" and not ops.is_available():
        return f"frn_det._C not built ({ops.load_error()})"
    if amp and not device.startswith("cuda"):
        return "detectron2's AMPTrainer requires CUDA"
    if name in RESIDENT_VARIANTS and not device.startswith("cuda"):
        return "resident planes are a setting of the CUDA kernels"
    if name in CPU_ONLY_VARIANTS and device != "cpu":
        return "the centred op has CPU kernels only"
    return None


def time_steps(variants, config, depth, images, size, device, warmup, iters, opts=(), amp=(False,)):
    """({(variant, amp): summary of StepTimes}, {(variant, amp): why skipped}) of ``config`` at
    ``images`` images of ``size`` = (height, width)."""
    skipped, trainers = {}, {}
    batch = make_batch(images, *size)
    for name, use_amp in itertools.product(variants, amp):
        if why := _why_not(name, use_amp, device):
            skipped[(name, use_amp)] = why
            continue
        norm, impl, lines = VARIANTS[name]
        cfg = make_cfg(config, depth, device, norm, impl, [*lines, *opts])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        trainer_class = AMPTrainer if use_amp else SimpleTrainer
        trainers[(name, use_amp)] = trainer_class(model, itertools.repeat(batch), build_optimizer(cfg, model))
    cuda = device.startswith("cuda")
    times = {key: StepTimes() for key in trainers}
    for i in range(warmup + iters):
        for key, trainer in trainers.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start_memory = torch.cuda.memory_allocated()
            resident = ops.cuda_resident_planes() if key[0] in RESIDENT_VARIANTS else contextlib.nullcontext()
            wall, cpu = time.perf_counter(), time.process_time()
            with resident:
                trainer.train(i, i + 1)  # one iteration, as detectron2's training loop runs it
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[key].wall.append(time.perf_counter() - wall)
                times[key].cpu.append(time.process_time() - cpu)
                if cuda:
                    times[key].memory.append(torch.cuda.max_memory_allocated() - start_memory)
    return {key: t.summary() for key, t in times.items()}, skipped


def format_table(results, skipped, variants, amp):
    """A markdown table: per variant and AMP setting, median ms with its range, the ratio to BN at the
    same AMP setting, CPU ms and peak step memory."""
    lines = ["| variant | AMP | median ms (min-max) | x BN | CPU ms | step memory MB |", "|---|---|---|---|---|---|"]
    for use_amp, name in itertools.product(amp, variants):
        key, on = (name, use_amp), "on" if use_amp else "off"
        if key in skipped:
            lines.append(f"| {name} | {on} | skipped: {skipped[key]} | | | |")
            continue
        r, bn = results[key], results.get(("BN", use_amp))
        ratio = f"{r['median_s'] / bn['median_s']:.2f}" if bn else "-"
        memory = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        lines.append(f"| {name} | {on} | {1e3 * r['median_s']:.1f} ({1e3 * r['min_s']:.1f}-{1e3 * r['max_s']:.1f}) "
                     f"| {ratio} | {1e3 * r['cpu_s']:.0f} | {memory} |")
    return "\n".join(lines)

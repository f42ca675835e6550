"""Seconds per training iteration (forward, backward, SGD step) of a stock detectron2 model with each
norm variant in all norm places (benchmarks/benchmark_step.py). The variants run interleaved (one
iteration of each per round) so that load on a shared machine hits them alike; the result is the
median over rounds after warm-up of the wall time and of the process CPU time."""
import statistics
import time

import torch
from detectron2 import model_zoo
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from frn_det.layers import ops
from frn_det.modeling import build_optimizer
from frn_det.engine.config import load_cfg, norm_everywhere

# name -> (norm name, MODEL.FRN.IMPL)
VARIANTS = {"BN": ("BN", None), "GN": ("GN", None), "FRN (op)": ("FRN", "op"), "FRN (reference)": ("FRN", "reference")}


def make_cfg(config, depth, device, norm, impl, opts=()):
    overrides = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "MODEL.RESNETS.DEPTH", depth]
    if depth in (18, 34):
        overrides += ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
    overrides += norm_everywhere(norm) + (["MODEL.FRN.IMPL", impl] if impl else [])
    return load_cfg(model_zoo.get_config_file(config), overrides + list(opts))


def make_batch(n, size, device):
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.1, 0.1, 0.55, 0.7], [0.4, 0.3, 0.95, 0.9]]) * size
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = True
    inst = Instances((size, size), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([1, 7]), gt_masks=BitMasks(masks))
    return [{"image": (torch.rand(3, size, size, generator=g) * 255).to(device), "instances": inst.to(device)}
            for _ in range(n)]


def _synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(variants, config, depth, images, size, device, warmup, iters, opts=()):
    """({variant: (median wall s, median CPU s)}, {variant: why skipped})."""
    skipped, steps = {}, {}
    for name in variants:
        norm, impl = VARIANTS[name]
        if impl == "op" and not ops.is_available():
            skipped[name] = f"frn_det._C not built ({ops.load_error()})"
            continue
        cfg = make_cfg(config, depth, device, norm, impl, opts)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        steps[name] = (model, build_optimizer(cfg, model))
    batch = make_batch(images, size, device)
    times = {name: ([], []) for name in steps}  # wall, process CPU
    with EventStorage(0):
        for i in range(warmup + iters):
            for name, (model, optimizer) in steps.items():
                _synchronize(device)
                wall, cpu = time.perf_counter(), time.process_time()
                loss = sum(model(batch).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                _synchronize(device)
                if i >= warmup:
                    times[name][0].append(time.perf_counter() - wall)
                    times[name][1].append(time.process_time() - cpu)
    return {name: tuple(statistics.median(t) for t in ts) for name, ts in times.items()}, skipped

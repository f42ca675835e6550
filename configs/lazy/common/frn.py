"""Shared parts of configs/lazy: FRN + TLU in every norm place of detectron2's model-zoo models
trained from scratch, the FRN-aware optimizer, and multi-step schedules. Each config file of
configs/lazy has a yacs twin (configs/coco, configs/synthetic) that builds the same model
(tests/test_lazy_configs.py)."""
import os

import torch
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from frn_det.engine.config import load_cfg
from frn_det.modeling import optimizer_params, with_frn_placement

CONFIGS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Divide by the pixel std when training from scratch (detectron2's scratch configs do).
SCRATCH_PIXEL_STD = [57.375, 57.12, 58.395]


def frn_from_scratch(backbone, norm="FRN"):
    """``norm`` in a ResNet-FPN backbone's stem, stages and FPN; torchvision-style bottlenecks."""
    backbone.bottom_up.stem.norm = norm
    backbone.bottom_up.stages.norm = norm
    backbone.bottom_up.stages.stride_in_1x1 = False
    backbone.norm = norm
    return backbone


def placed(model):
    """``instantiate`` gives the model with the paper's FRN placement (frn_det.apply_frn_placement)."""
    return L(with_frn_placement)(model=model)


def frn_sgd(lr, weight_decay):
    """detectron2's SGD, FRN and TLU parameters treated as norm parameters (no weight decay)."""
    return L(torch.optim.SGD)(params=L(optimizer_params)(weight_decay_norm=0.0), lr=lr, momentum=0.9,
                              weight_decay=weight_decay)


def yacs_twin_solver(relpath):
    """SOLVER of the yacs config configs/<relpath>: the one source of a twin's schedule (batch, lr,
    iterations, weight decay), so the two cannot drift apart."""
    return load_cfg(os.path.join(CONFIGS, relpath)).SOLVER


def step_schedule(max_iter, steps, warmup_iters):
    """lr x 0.1 at each of ``steps``, after a linear warm-up from 0.001 x lr (yacs' WarmupMultiStepLR)."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[0.1**k for k in range(len(steps) + 1)],
                                             milestones=list(steps), num_updates=max_iter),
        warmup_length=warmup_iters / max_iter, warmup_method="linear", warmup_factor=0.001)

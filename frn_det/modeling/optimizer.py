"""detectron2's default optimizer with FRN and TLU counted as norm layers.

``get_default_optimizer_params`` gives SOLVER.WEIGHT_DECAY_NORM only to modules in a hard-coded
tuple of torch norm classes, so FRN's weight / bias / eps_l and TLU's tau would silently get
SOLVER.WEIGHT_DECAY while BN and GN baselines get WEIGHT_DECAY_NORM.
"""
import torch
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping, reduce_param_groups
from detectron2.utils.env import TORCH_VERSION

from ..layers import TLU, FilterResponseNorm2d

NORM_MODULE_TYPES = (FilterResponseNorm2d, TLU)


def get_optimizer_params(cfg, model: torch.nn.Module):
    """Param groups of detectron2's ``build_optimizer``, FRN/TLU parameters treated as norm ones."""
    solver = cfg.SOLVER
    common = dict(base_lr=solver.BASE_LR, bias_lr_factor=solver.BIAS_LR_FACTOR,
                  weight_decay_bias=solver.WEIGHT_DECAY_BIAS)
    params = get_default_optimizer_params(model, weight_decay_norm=solver.WEIGHT_DECAY_NORM, **common)
    # For a BN module detectron2 sets WEIGHT_DECAY_NORM, then applies the bias overrides: the same
    # call on each FRN/TLU module with weight_decay=WEIGHT_DECAY_NORM gives exactly that, and
    # reduce_param_groups lets these later groups override the model-wide ones per parameter.
    for module in model.modules():
        if isinstance(module, NORM_MODULE_TYPES):
            params += get_default_optimizer_params(module, weight_decay=solver.WEIGHT_DECAY_NORM, **common)
    return reduce_param_groups(params)


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``detectron2.solver.build_optimizer`` (SGD, same cfg keys) with FRN/TLU as norm layers."""
    sgd_args = {
        "params": get_optimizer_params(cfg, model),
        "lr": cfg.SOLVER.BASE_LR,
        "momentum": cfg.SOLVER.MOMENTUM,
        "nesterov": cfg.SOLVER.NESTEROV,
        "weight_decay": cfg.SOLVER.WEIGHT_DECAY,
    }
    if TORCH_VERSION >= (1, 12):
        sgd_args["foreach"] = True
    return maybe_add_gradient_clipping(cfg, torch.optim.SGD(**sgd_args))


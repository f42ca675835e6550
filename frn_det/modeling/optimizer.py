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


def optimizer_params(model: torch.nn.Module, base_lr=None, weight_decay_norm=None, bias_lr_factor=1.0,
                     weight_decay_bias=None):
    """detectron2's ``get_default_optimizer_params`` (same arguments; LazyConfigs call it as theirs)
    with FRN and TLU parameters treated as norm parameters."""
    common = dict(base_lr=base_lr, bias_lr_factor=bias_lr_factor, weight_decay_bias=weight_decay_bias)
    params = get_default_optimizer_params(model, weight_decay_norm=weight_decay_norm, **common)
    # For a BN module detectron2 sets weight_decay_norm, then applies the bias overrides: the same
    # call on each FRN/TLU module with weight_decay=weight_decay_norm gives exactly that, and
    # reduce_param_groups lets these later groups override the model-wide ones per parameter.
    for module in model.modules():
        if isinstance(module, NORM_MODULE_TYPES):
            params += get_default_optimizer_params(module, weight_decay=weight_decay_norm, **common)
    return reduce_param_groups(params)


def get_optimizer_params(cfg, model: torch.nn.Module):
    """Param groups of detectron2's ``build_optimizer``, FRN/TLU parameters treated as norm ones."""
    solver = cfg.SOLVER
    return optimizer_params(model, base_lr=solver.BASE_LR, weight_decay_norm=solver.WEIGHT_DECAY_NORM,
                            bias_lr_factor=solver.BIAS_LR_FACTOR, weight_decay_bias=solver.WEIGHT_DECAY_BIAS)


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


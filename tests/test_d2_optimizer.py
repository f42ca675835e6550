"""frn_det.build_optimizer: FRN/TLU parameters get SOLVER.WEIGHT_DECAY_NORM, as BN/GN ones do."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer as d2_build_optimizer

import frn_det
from d2_testing import R18, RETINANET, make_cfg, norm_params
from frn_det.engine import Trainer

SOLVER = ("MODEL.BACKBONE.FREEZE_AT", 0, "SOLVER.BASE_LR", 0.02, "SOLVER.WEIGHT_DECAY", 1e-4,
          "SOLVER.WEIGHT_DECAY_NORM", 5e-5)
BIAS = ("SOLVER.BIAS_LR_FACTOR", 2.0, "SOLVER.WEIGHT_DECAY_BIAS", 3e-4)


def hyperparams(model, optimizer):
    """{parameter name: (lr, weight_decay)} as the optimizer applies them; every trainable param once."""
    by_param = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert p not in by_param, "parameter in two groups"
            by_param[p] = (group["lr"], group["weight_decay"])
    names = {n: by_param.pop(p) for n, p in model.named_parameters() if p.requires_grad}
    assert not by_param
    return names


def setup(norm, *opts):
    cfg = make_cfg(RETINANET, norm, *R18, *SOLVER, *opts)
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_frn_and_tlu_parameters_get_weight_decay_norm():
    cfg, model = setup("FRN")
    ours = hyperparams(model, frn_det.build_optimizer(cfg, model))
    names = [n for n, _ in norm_params(model)]
    assert any(n.endswith(".tau") for n in names) and any(n.endswith(".eps_l") for n in names)
    assert any(n.endswith(".tlu.tau") for n in names)
    assert all(ours[n] == (0.02, 5e-5) for n in names)
    convs = [n for n, p in model.named_parameters() if p.dim() == 4]
    assert len(convs) > 30 and all(ours[n] == (0.02, 1e-4) for n in convs)
    # the trap this avoids: detectron2's own optimizer decays FRN/TLU parameters like conv weights
    stock = hyperparams(model, d2_build_optimizer(cfg, model))
    assert all(stock[n] == (0.02, 1e-4) for n in names)


@pytest.mark.parametrize("opts", [(), BIAS], ids=["default", "bias_overrides"])
def test_frn_model_gets_the_hyperparameters_detectron2_gives_gn(opts):
    cfg, frn_model = setup("FRN", *opts)
    _, gn_model = setup("GN", *opts)
    ours = hyperparams(frn_model, frn_det.build_optimizer(cfg, frn_model))
    gn = hyperparams(gn_model, d2_build_optimizer(cfg, gn_model))
    assert ours.keys() >= gn.keys()
    assert all(ours[n] == gn[n] for n in gn)  # convs, heads, FRN weight / bias vs GN weight / bias
    gn_weight = gn["backbone.fpn_lateral3.norm.weight"]
    assert gn_weight[1] == 5e-5
    assert all(ours[n] == gn_weight for n in ours.keys() - gn.keys())  # tau, eps_l


def test_matches_detectron2_on_stock_models_including_gradient_clipping():
    cfg, model = setup("GN", *BIAS, "SOLVER.CLIP_GRADIENTS.ENABLED", True)
    ours, stock = frn_det.build_optimizer(cfg, model), d2_build_optimizer(cfg, model)
    assert type(ours).__name__ == type(stock).__name__ == "SGDWithGradientClip"
    assert ours.defaults == stock.defaults
    assert hyperparams(model, ours) == hyperparams(model, stock)


def test_trainer_builds_the_frn_optimizer():
    cfg, model = setup("FRN")
    assert hyperparams(model, Trainer.build_optimizer(cfg, model)) == \
        hyperparams(model, frn_det.build_optimizer(cfg, model))

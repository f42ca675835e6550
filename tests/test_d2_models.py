"""FRN models built from stock model-zoo configs: placement, training, inference, checkpoints."""
import copy
import logging
import math
import pickle

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from d2_testing import (MASK_RCNN, R18, RETINANET, STOCK_NORM_TYPES, ReluAfterNorm, batch, build, frn_modules,
                        images, norm_params)
from frn_det import TLU, FilterResponseNorm2d

MODELS = {
    "retinanet_R50": (RETINANET,),
    "mask_rcnn_R50": (MASK_RCNN,),
    "retinanet_R18": (RETINANET, "FRN", *R18),
}


@pytest.fixture(scope="module")
def models():
    return {name: build(*args) for name, args in MODELS.items()}


def resnet_blocks(model):
    resnet = model.backbone.bottom_up
    return [block for stage in resnet.stages for block in stage]


def expected_tlu(name, basic_block):
    """The TLU state the paper's placement gives the FRN at module path ``name``."""
    if ".fpn_" in name:
        return False
    if name.endswith("stem.conv1.norm") or ".cls_subnet." in name or ".bbox_subnet." in name:
        return True
    if ".box_head.conv" in name or ".mask_head.mask_fcn" in name:
        return True
    if name.endswith((".conv3.norm", ".shortcut.norm")):
        return False
    if name.endswith(".conv1.norm"):
        return True
    if name.endswith(".conv2.norm"):
        return not basic_block
    raise AssertionError(f"no placement rule for {name}")


@pytest.mark.parametrize("name", list(MODELS))
def test_structure_follows_placement(models, name):
    model = models[name]
    leftovers = [n for n, m in model.named_modules() if isinstance(m, STOCK_NORM_TYPES)]
    assert not leftovers, f"stock norms left: {leftovers[:5]}"

    basic = name.endswith("R18")
    frns = frn_modules(model)
    wrong = [n for n, m in frns if (m.tau is not None) != expected_tlu(n, basic)]
    assert not wrong, f"TLU state differs from the placement: {wrong}"
    parts = ("stem", "res5", "fpn_", "head." if "retinanet" in name else "box_head")
    assert all(any(p in n for n, _ in frns) for p in parts)

    blocks = resnet_blocks(model)
    assert all(isinstance(b, BasicBlock if basic else BottleneckBlock) for b in blocks)
    assert all(isinstance(b.tlu, TLU) and b.tlu.num_features == b.out_channels for b in blocks)

    # no ReLU module / Conv2d activation directly after an FRN+TLU
    for parent_name, parent in model.named_modules():
        if isinstance(getattr(parent, "norm", None), FilterResponseNorm2d) and parent.norm.tau is not None:
            assert parent.activation is None, parent_name
        if isinstance(parent, nn.Sequential):
            for a, b in zip(parent, list(parent)[1:]):
                if isinstance(a, FilterResponseNorm2d) and a.tau is not None:
                    assert not isinstance(b, nn.ReLU), parent_name


def test_freeze_at_freezes_frn_and_tlu_parameters(models):
    model = models["retinanet_R50"]  # stock FREEZE_AT = 2: stem and res2
    resnet = model.backbone.bottom_up
    frozen = list(resnet.stem.parameters()) + list(resnet.res2.parameters())
    frozen_norms = [p for n, p in norm_params(resnet) if n.startswith(("stem.", "res2."))]
    assert any(p.dim() == 1 for p in frozen_norms) and "res2.0.tlu.tau" in dict(norm_params(resnet))
    assert all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for n, p in norm_params(model) if not n.startswith(("backbone.bottom_up.stem.",
                                                                                     "backbone.bottom_up.res2.")))


@pytest.mark.parametrize("name", ["retinanet_R18", "mask_rcnn_R50"])
def test_training_step(models, name):
    model = models[name]
    model.train()
    model.zero_grad(set_to_none=True)
    with EventStorage(0), ReluAfterNorm(model) as seen:
        losses = model(batch(images(2), with_targets=True))
    assert not seen.after_tlu, f"ReLU applied to a TLU output: {seen.after_tlu}"
    assert not seen.after_frn  # every FRN is followed by a TLU or, in FPN, by nothing
    assert seen.tlu_calls == len(resnet_blocks(model))  # one post-add TLU per block
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    sum(losses.values()).backward()
    params = norm_params(model)
    assert len(params) > 50
    no_grad = [n for n, p in params if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not no_grad, f"zero or missing gradient: {no_grad}"
    assert all(p.grad is None for _, p in params if not p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_inference_with_no_surviving_proposal(models):
    model = models["mask_rcnn_R50"]
    model.eval()
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, key=key: seen.__setitem__(key, out.shape))
             for key, m in (("box", model.roi_heads.box_head.conv1.norm),
                            ("mask", model.roi_heads.mask_head.mask_fcn1.norm))]
    empty = Instances((128, 128), proposal_boxes=Boxes(torch.zeros(0, 4)), objectness_logits=torch.zeros(0))
    inputs = [dict(b, proposals=empty) for b in batch(images(2))]
    rpn, model.proposal_generator = model.proposal_generator, None  # detectron2 then reads "proposals"
    try:
        with torch.no_grad():
            outputs = model(inputs)
    finally:
        model.proposal_generator = rpn
        for h in hooks:
            h.remove()
    assert seen["box"][0] == 0 and seen["mask"][0] == 0, seen
    for out in outputs:
        inst = out["instances"]
        assert len(inst) == 0 and inst.pred_masks.shape[0] == 0


def detections(model, imgs):
    """The first image's detections; R-CNN: raw mask probabilities (not thresholded at 0.5)."""
    if hasattr(model, "roi_heads"):
        return model.inference(batch(imgs), do_postprocess=False)[0]
    return model(batch(imgs))[0]["instances"]


@pytest.mark.parametrize("name,opts", [
    ("retinanet_R18", ("MODEL.RETINANET.SCORE_THRESH_TEST", 0.0)),
    ("mask_rcnn_R50", ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "TEST.DETECTIONS_PER_IMAGE", 20)),
])
def test_eval_detections_are_batch_independent(name, opts):
    args = MODELS[name]
    model = build(args[0], "FRN", *args[2:], *opts).eval()
    a, *others = images(3, seed=1)
    with torch.no_grad():
        alone, batched = detections(model, [a]), detections(model, [a, *others])
    assert len(alone) >= 20
    assert len(alone) == len(batched)
    assert torch.equal(alone.pred_classes, batched.pred_classes)
    # equal up to float rounding (conv kernels may differ with batch size; boxes are in pixels)
    torch.testing.assert_close(batched.pred_boxes.tensor, alone.pred_boxes.tensor, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(batched.scores, alone.scores, rtol=1e-5, atol=1e-6)
    if alone.has("pred_masks"):
        torch.testing.assert_close(batched.pred_masks, alone.pred_masks, rtol=1e-4, atol=1e-6)


# Documented state-dict keys of FRN models: the GN model's keys (weight / bias per norm, same
# module paths; RetinaNet's ReLUs become nn.Identity so subnet indices are unchanged) plus
TAU_KEYS = ("backbone.bottom_up.stem.conv1.norm.tau", "backbone.bottom_up.res2.0.conv1.norm.tau",
            "head.cls_subnet.1.tau")  # FRN+TLU threshold
POST_ADD_TLU_KEYS = ("backbone.bottom_up.res2.0.tlu.tau", "backbone.bottom_up.res5.1.tlu.tau")
LEARNED_EPS_KEYS = ("head.cls_subnet.1.eps_l", "head.bbox_subnet.10.eps_l")  # LEARNED_EPS "auto"


def test_checkpoint_keys_are_documented_and_stable(models):
    frn_keys = list(models["retinanet_R18"].state_dict())
    assert frn_keys == list(build(RETINANET, "FRN", *R18, seed=1).state_dict())
    gn_keys = set(build(RETINANET, "GN", *R18).state_dict())
    assert {k for k in frn_keys if not k.endswith((".tau", ".eps_l"))} == gn_keys
    assert set(TAU_KEYS + POST_ADD_TLU_KEYS + LEARNED_EPS_KEYS) <= set(frn_keys)
    assert all(k.startswith("head.") for k in frn_keys if k.endswith(".eps_l"))


def test_loading_bn_checkpoint_loads_convs_and_reports_norms(models, tmp_path, caplog):
    bn = build(RETINANET, "BN", *R18, seed=3)
    DetectionCheckpointer(bn, save_dir=str(tmp_path)).save("bn")
    frn = build(RETINANET, "FRN", *R18)
    with caplog.at_level(logging.INFO):
        DetectionCheckpointer(frn).load(str(tmp_path / "bn.pth"))
    bn_state, frn_state = bn.state_dict(), frn.state_dict()
    convs = [k for k, v in bn_state.items() if v.dim() == 4]
    assert len(convs) > 30 and any(k.startswith("head.cls_subnet.3.") for k in convs)
    assert all(torch.equal(frn_state[k], bn_state[k]) for k in convs)
    log = caplog.text
    assert "not found in the checkpoint" in log and "contains keys that are not used by the model" in log
    # grouped by module: e.g. "backbone.bottom_up.res2.0.conv1.norm.{bias, tau, weight}" missing, and
    # "backbone.bottom_up.res2.0.conv1.norm.{num_batches_tracked, running_mean, running_var}" unused
    assert "backbone.bottom_up.res2.0.tlu.tau" in log
    assert "backbone.bottom_up.stem.conv1.norm.tau" in log
    assert "running_mean" in log and "running_var" in log
    n_frn = len(frn_modules(frn))
    assert f"{n_frn - 8} of {n_frn} FRN layers were loaded from BatchNorm entries" in log  # head: CycleBN keys


def test_frn_models_pickle_and_deepcopy(models):
    model = models["retinanet_R18"]
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert [type(m) for m in clone.modules()] == [type(m) for m in model.modules()]
        assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), model.state_dict().values()))

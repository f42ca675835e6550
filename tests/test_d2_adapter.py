"""frn_det.modeling: the adapter (install / uninstall, stock norms unchanged), MODEL.FRN options, the
placement transform, the eps policy."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec, batch_norm
from detectron2.modeling.backbone import resnet
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from torch import nn

import d2_testing
import frn_det
from d2_testing import MASK_RCNN, R18, RETINANET, ReluAfterNorm, batch, build, frn_modules, images, make_cfg
from frn_det import TLU, FilterResponseNorm2d
from frn_det.modeling import FRNOptions, apply_frn_placement
from frn_det.modeling import norm_adapter as adapter
from frn_det.layers import frn
from frn_det.layers.filter_response_norm import resolve_impl


@pytest.fixture
def uninstalled():
    adapter.uninstall()
    try:
        yield
    finally:
        adapter.install()


def patched_sites():
    """Every (module name, attribute) of a loaded detectron2 module bound to a function the adapter replaces."""
    import sys

    names = {"get_norm", "build_model", "build_backbone"}
    return {(n, a): getattr(m, a) for n, m in list(sys.modules.items()) if n.startswith("detectron2") and m
            for a in names if a in vars(m)}


def test_install_is_idempotent_and_uninstall_restores_detectron2(uninstalled):
    import detectron2.engine.defaults  # noqa: F401  (binds build_model too)

    stock = patched_sites()
    stock_inits = {cls: cls.__init__ for cls in (BasicBlock, BottleneckBlock, RetinaNetHead)}
    assert not adapter.is_installed()
    with pytest.raises(KeyError):
        resnet.get_norm("FRN", 8)

    adapter.install()
    adapter.install()
    ours = patched_sites()
    assert set(ours) == set(stock)
    assert all(ours[k] is not stock[k] for k in stock), "a consumer still binds a stock function"
    assert ours[("detectron2.engine.defaults", "build_model")].__wrapped__ is stock[("detectron2.engine.defaults", "build_model")]
    assert adapter.is_installed()
    assert {cls: cls.__init__ for cls in stock_inits} == stock_inits  # no stock class is touched
    assert isinstance(resnet.get_norm("FRN", 8), FilterResponseNorm2d)
    # also rebound in modules outside detectron2, e.g. this helper that imported it before frn_det
    assert d2_testing.build_model is ours[("detectron2.modeling", "build_model")]

    adapter.uninstall()
    adapter.uninstall()
    assert patched_sites() == stock
    assert d2_testing.build_model is stock[("detectron2.modeling", "build_model")]
    assert {cls: cls.__init__ for cls in stock_inits} == stock_inits


def test_unknown_norm_names_raise_listing_valid_names():
    for get_norm in (resnet.get_norm, batch_norm.get_norm, adapter.get_norm):
        with pytest.raises(KeyError, match=r"Unknown norm 'XYZ'; valid names: BN, SyncBN, .*GN.*, FRN"):
            get_norm("XYZ", 8)
    with pytest.raises(KeyError, match="FRN"):
        build(RETINANET, "XYZ", *R18)


def test_stock_norm_names_are_detectron2s():
    for name in adapter.STOCK_NORM_NAMES:
        assert isinstance(adapter._STOCK_GET_NORM(name, 32), nn.Module), name
    assert adapter.get_norm("", 8) is None and adapter.get_norm(None, 8) is None
    assert isinstance(adapter.get_norm(lambda c: nn.Identity(), 8), nn.Identity)


@pytest.mark.parametrize("norm", ["BN", "GN"])
@pytest.mark.parametrize("config,opts", [(RETINANET, ()), (MASK_RCNN, R18)], ids=["retinanet_R50", "mask_rcnn_R18"])
def test_stock_models_are_unchanged_by_the_adapter(uninstalled, norm, config, opts):
    inputs = batch(images(1))
    keep_all = ("MODEL.RETINANET.SCORE_THRESH_TEST", 0.0, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                "TEST.DETECTIONS_PER_IMAGE", 20)

    def build_and_run():
        model = build(config, norm, *opts, *keep_all).eval()
        with torch.no_grad():
            return model, model(inputs)[0]["instances"]

    stock_model, stock_out = build_and_run()
    adapter.install()
    model, out = build_and_run()
    assert repr(model) == repr(stock_model)
    assert [type(m) for m in model.modules()] == [type(m) for m in stock_model.modules()]
    state, stock_state = model.state_dict(), stock_model.state_dict()
    assert list(state) == list(stock_state)
    assert all(torch.equal(state[k], stock_state[k]) for k in state)
    assert len(out) > 0
    for field in ("scores", "pred_classes", "pred_masks"):
        assert torch.equal(out.get(field), stock_out.get(field)) if out.has(field) else field == "pred_masks"
    assert torch.equal(out.pred_boxes.tensor, stock_out.pred_boxes.tensor)


def test_add_frn_config_is_idempotent():
    cfg = get_cfg()
    frn_det.add_frn_config(cfg)
    assert dict(cfg.MODEL.FRN) == {"EPS": 1e-6, "LEARNED_EPS": "auto", "ACTIVATION": "TLU", "IMPL": "auto",
                                   "NUM_GROUPS": 0, "CENTERED": False}
    assert cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL is False
    cfg.MODEL.FRN.EPS = 1e-3
    frn_det.add_frn_config(cfg)
    assert cfg.MODEL.FRN.EPS == 1e-3
    assert FRNOptions.from_cfg(cfg) == FRNOptions(eps=1e-3)
    assert FRNOptions.from_cfg(get_cfg()) is None


def test_cfg_options_reach_every_frn_layer():
    model = build(RETINANET, "FRN", *R18, "MODEL.FRN.EPS", 1e-5, "MODEL.FRN.LEARNED_EPS", "all",
                  "MODEL.FRN.IMPL", "reference")
    frns = frn_modules(model)
    assert all(m.eps == 1e-5 and m.eps_l is not None and m.impl == "reference" for _, m in frns)

    model = build(RETINANET, "FRN", *R18, "MODEL.FRN.LEARNED_EPS", "none")
    assert all(m.eps_l is None for _, m in frn_modules(model))


@pytest.mark.parametrize("frn_config", [True, False], ids=["defaults", "cfg_without_MODEL.FRN"])
def test_default_options_learn_eps_only_in_the_retinanet_head(frn_config):
    model = build(RETINANET, "FRN", *R18, frn_config=frn_config)
    frns = frn_modules(model)
    assert all(m.eps == 1e-6 and m.impl == resolve_impl() for _, m in frns)  # resolved at build
    learned = {n for n, m in frns if m.eps_l is not None}
    assert learned == {n for n, _ in frns if n.startswith("head.")} and len(learned) == 8
    assert all(m.tau is not None for n, m in frns if n.startswith("head."))  # "TLU" placement


@pytest.mark.parametrize("key,value", [("ACTIVATION", "GELU"), ("LEARNED_EPS", "some"), ("IMPL", "cuda")])
def test_invalid_options_raise(key, value):
    with pytest.raises(ValueError, match=f"MODEL.FRN.{key}"):
        build(RETINANET, "FRN", *R18, f"MODEL.FRN.{key}", value)


def test_relu_mode_keeps_detectron2_relus_and_drops_every_tlu():
    model = build(RETINANET, "FRN", *R18, "MODEL.FRN.ACTIVATION", "RELU").eval()
    assert all(m.tau is None for _, m in frn_modules(model))
    assert not any(isinstance(m, TLU) for m in model.modules())
    assert all(type(b) is BasicBlock for stage in model.backbone.bottom_up.stages for b in stage)
    assert sum(isinstance(m, nn.ReLU) for m in model.head.modules()) == 8
    with torch.no_grad(), ReluAfterNorm(model) as seen:
        model(batch(images(1)))
    # stem, conv1 of each block, each block's add (in-place on conv2's output), head: the ReLUs that
    # follow detectron2's norms; this also shows the detector used by the TLU-mode tests works.
    assert len(seen.after_frn) == 1 + 2 * 8 + 8 * 5 and not seen.after_tlu


def test_parts_built_by_hand_get_the_placement_from_apply_frn_placement():
    shapes = [ShapeSpec(channels=16)] * 5
    head = RetinaNetHead(input_shape=shapes, num_classes=3, num_anchors=1, conv_dims=[16], norm="FRN")
    assert head.cls_subnet[1].tau is None and isinstance(head.cls_subnet[2], nn.ReLU)  # get_norm: plain FRN
    assert apply_frn_placement(head) is head
    assert head.cls_subnet[1].eps_l is not None and head.cls_subnet[1].tau is not None
    assert isinstance(head.cls_subnet[2], nn.Identity)
    with adapter.frn_options(learned_eps="none", eps=1e-4) as options:
        assert options.eps == 1e-4
        head = apply_frn_placement(
            RetinaNetHead(input_shape=shapes, num_classes=3, num_anchors=1, conv_dims=[16], norm="FRN"), options)
        block = apply_frn_placement(BottleneckBlock(8, 16, bottleneck_channels=4, norm="FRN"), options)
        with adapter.frn_options(make_cfg(RETINANET, "FRN", "MODEL.FRN.ACTIVATION", "RELU")) as relu:
            plain = apply_frn_placement(BasicBlock(8, 16, norm="FRN"), relu)
    assert head.cls_subnet[1].eps_l is None and head.cls_subnet[1].eps == 1e-4
    assert isinstance(head.cls_subnet[2], nn.Identity)
    assert type(block).__name__ == "FRNBottleneckBlock" and block.conv3.norm.tau is None
    assert type(plain) is BasicBlock and plain.conv1.norm.tau is None and not hasattr(plain, "tlu")
    assert block(torch.randn(2, 8, 6, 6)).shape == (2, 16, 6, 6)


def test_placement_is_in_place_idempotent_and_keeps_device_and_dtype():
    block = BasicBlock(8, 16, stride=2, norm="FRN").double()
    conv1_norm = block.conv1.norm
    apply_frn_placement(block)
    assert block.conv1.norm is conv1_norm  # changed in place, not rebuilt
    assert type(block).__name__ == "FRNBasicBlock"
    assert all(p.dtype == torch.float64 for p in block.parameters())
    keys = list(block.state_dict())
    assert keys == list(apply_frn_placement(block).state_dict())  # a second call changes nothing
    assert {"conv1.norm.tau", "tlu.tau"} <= set(keys) and "conv2.norm.tau" not in keys
    meta = apply_frn_placement(BasicBlock(8, 8, norm="FRN").to("meta"), FRNOptions(learned_eps="all"))
    assert all(p.device.type == "meta" for p in meta.parameters()) and meta.conv2.norm.eps_l is not None


def test_build_model_enters_the_options_and_places_once(monkeypatch):
    entered, placed = [], []
    real_options, real_place = adapter.frn_options, adapter.apply_frn_placement
    monkeypatch.setattr(adapter, "frn_options", lambda *a, **k: entered.append(a) or real_options(*a, **k))
    monkeypatch.setattr(adapter, "apply_frn_placement", lambda m, o: placed.append(type(m).__name__) or real_place(m, o))
    model = build(RETINANET, "FRN", *R18)  # build_model -> RetinaNet.from_config -> build_backbone
    assert len(entered) == 1 and placed == ["RetinaNet"]
    assert type(model.backbone.bottom_up.stem).__name__ == "FRNBasicStem"
    entered.clear(), placed.clear()
    build(RETINANET, "GN", *R18)
    assert len(entered) == 1 and placed == []  # no FRN: stock models are left as they are


def test_learned_eps_keeps_1x1_planes_from_degenerating_to_sign():
    """P7 of a 128x128 image is 1x1: the head's FRNs there must not compute sign(x)."""
    model = build(RETINANET, "FRN", *R18).eval()
    features = model.backbone(model.preprocess_image(batch(images(2))).tensor)
    p7 = features["p7"].detach().requires_grad_()
    assert p7.shape[-2:] == (1, 1)
    head = model.head
    norm = head.cls_subnet[1]
    x = head.cls_subnet[0](p7)
    y = frn(x, norm.weight, norm.bias, None, norm.eps, norm.eps_l)  # the FRN before its TLU
    y_fixed = frn(x, norm.weight, norm.bias, None, norm.eps, None)  # what a fixed eps would give
    assert torch.isfinite(y).all()
    unsaturated = (y.abs() < 0.99).float().mean().item()
    assert unsaturated > 0.3, unsaturated
    assert (y_fixed.abs() < 0.99).float().mean().item() < 0.1  # fixed 1e-6: ~sign(x)

    (head.cls_score(head.cls_subnet(p7)).sum() + head.bbox_pred(head.bbox_subnet(p7)).sum()).backward()
    assert torch.isfinite(p7.grad).all() and p7.grad.abs().sum() > 0
    for m in head.cls_subnet:
        if isinstance(m, FilterResponseNorm2d):
            assert m.eps_l.grad is not None and m.eps_l.grad.abs() > 0

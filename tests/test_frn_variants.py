"""The study's variants of FRN (docs/results.md, "Why FRN trails GN"): statistics pooled over channel
groups (MODEL.FRN.NUM_GROUPS), centred statistics (MODEL.FRN.CENTERED) and zero-initialised residual
branches for every norm (MODEL.RESNETS.ZERO_INIT_RESIDUAL). Each against a written-out float64 formula,
gradcheck, batch independence, export, and its config key."""
import itertools
import math

import onnxruntime
import pytest
import torch
from torch.nn import functional as F

from d2_testing import R18, RETINANET, build, make_cfg
from frn_det.layers import FilterResponseNorm2d, frn, frn_reference
from frn_det.layers import ops
from frn_det.modeling import FRNOptions, zero_init_residual_norms
from frn_testing import make_inputs

VARIANTS = [(None, True), (2, False), (2, True), (6, False)]  # (num_groups, centered), C = 6


def written_out(x, weight, bias, tau, eps, eps_l, num_groups, centered):
    """The variant's formula element by element, in Python floats (float64)."""
    n, c, h, w = x.shape
    groups = c if num_groups is None else num_groups
    size = c // groups
    eps_eff = eps + (abs(float(eps_l)) if eps_l is not None else 0.0)
    out = torch.empty(x.shape, dtype=torch.float64)
    for i, g in itertools.product(range(n), range(groups)):
        values = [float(x[i, k, a, b]) for k in range(g * size, (g + 1) * size) for a in range(h) for b in range(w)]
        mu = sum(values) / len(values) if centered else 0.0
        var = sum((v - mu) ** 2 for v in values) / len(values)
        for k, a, b in itertools.product(range(g * size, (g + 1) * size), range(h), range(w)):
            y = float(weight[k]) * (float(x[i, k, a, b]) - mu) / math.sqrt(var + eps_eff) + float(bias[k])
            out[i, k, a, b] = max(y, float(tau[k])) if tau is not None else y
    return out


@pytest.mark.parametrize("num_groups,centered", VARIANTS)
@pytest.mark.parametrize("tlu,learned_eps", [(True, False), (False, True)])
def test_variant_equals_its_written_out_formula(num_groups, centered, tlu, learned_eps):
    x, w, b, t, e = make_inputs((2, 6, 3, 4), tlu=tlu, learned_eps=learned_eps, requires_grad=False)
    got = frn(x, w, b, t, 1e-3, e, num_groups=num_groups, centered=centered)
    torch.testing.assert_close(got, written_out(x, w, b, t, 1e-3, e, num_groups, centered), atol=1e-12, rtol=1e-12)


def test_grouped_centred_variant_is_groupnorm_then_affine_then_tlu():
    # the code computes it with F.group_norm: the expected value is the written-out formula
    x, w, b, t, _ = make_inputs((3, 8, 5, 5), requires_grad=False)
    expected = written_out(x, w, b, t, 1e-5, None, 4, True)
    torch.testing.assert_close(frn(x, w, b, t, 1e-5, num_groups=4, centered=True), expected, atol=1e-12, rtol=1e-12)
    per_channel = F.instance_norm(x, weight=w, bias=b, eps=1e-5)
    torch.testing.assert_close(frn(x, w, b, None, 1e-5, centered=True), per_channel)


@pytest.mark.parametrize("num_groups,centered", VARIANTS)
@pytest.mark.parametrize("learned_eps", [True, False])  # centred with a fixed eps: GroupNorm's kernel
def test_variant_gradcheck(num_groups, centered, learned_eps):
    x, w, b, t, e = make_inputs((2, 6, 2, 3), learned_eps=learned_eps)
    with torch.no_grad():  # keep inputs away from the TLU's kink, where finite differences disagree
        t -= 3.0
    inputs = (x, w, b, t) + ((e,) if learned_eps else ())
    torch.autograd.gradcheck(lambda *a: frn(*a[:4], 1e-3, *a[4:], num_groups=num_groups, centered=centered), inputs)


@pytest.mark.parametrize("num_groups,centered", VARIANTS)
def test_variant_is_batch_independent_and_handles_empty_and_1x1(num_groups, centered):
    x, w, b, t, _ = make_inputs((4, 6, 3, 3), requires_grad=False)
    full = frn(x, w, b, t, num_groups=num_groups, centered=centered)
    for i in range(4):
        torch.testing.assert_close(frn(x[i:i + 1], w, b, t, num_groups=num_groups, centered=centered), full[i:i + 1],
                                   atol=0, rtol=0)
    empty = frn(x[:0], w, b, t, num_groups=num_groups, centered=centered)
    assert empty.shape == (0, 6, 3, 3)
    one = frn(x[:, :, :1, :1], w, b, t, num_groups=num_groups, centered=centered)
    assert torch.isfinite(one).all()


def test_variant_keeps_dtype_and_memory_format_and_propagates_nan():
    x, w, b, t, _ = make_inputs((2, 6, 3, 4), dtype=torch.bfloat16, param_dtype=torch.float32, channels_last=True,
                                requires_grad=False)
    out = frn(x, w, b, t, num_groups=3, centered=True)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    x = x.float().contiguous()
    x[1, 2, 0, 0] = float("nan")
    out = frn(x, w, b, t, num_groups=3)
    assert torch.isnan(out[1, 2:4]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[1, :2]).all()


def test_bad_group_counts_and_the_op_are_refused():
    x, w, b, t, _ = make_inputs((2, 6, 3, 3), requires_grad=False)
    for bad in (4, 0, -2, 2.0, True):
        with pytest.raises(ValueError, match="num_groups must be a positive divisor of the 6 channels"):
            frn_reference(x, w, b, t, num_groups=bad)
    with pytest.raises(ValueError, match="num_groups runs in the reference"):
        frn(x, w, b, t, impl="op", num_groups=3, centered=True)
    with pytest.raises(ValueError, match="num_groups runs in the reference"):
        FilterResponseNorm2d(6, impl="op", num_groups=3)


def test_the_paper_frn_is_unchanged_and_variants_resolve_to_the_reference():
    x, w, b, t, e = make_inputs((2, 6, 3, 4), dtype=torch.float32, learned_eps=True, requires_grad=False)
    layer = FilterResponseNorm2d(6, learned_eps=True)
    assert layer.num_groups == 0 and not layer.centered
    assert "num_groups" not in repr(layer) and "centered" not in repr(layer)
    variant = FilterResponseNorm2d(6, impl="auto", num_groups=2, centered=True)
    assert variant.impl == "reference" and "num_groups=2, centered=True" in repr(variant)
    if ops.is_available():  # per channel, uncentred: the op, and the reference agrees with it
        torch.testing.assert_close(frn(x, w, b, t, 1e-6, e, impl="op"), frn_reference(x, w, b, t, 1e-6, e))


@pytest.mark.parametrize("num_groups,centered", VARIANTS)
@pytest.mark.parametrize("learned_eps", [True, False])
def test_variant_layers_script_trace_and_export_to_onnx(tmp_path, num_groups, centered, learned_eps):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), FilterResponseNorm2d(
        6, learned_eps=learned_eps, num_groups=num_groups, centered=centered)).eval()
    with torch.no_grad():
        m[1].tau.uniform_(-0.3, 0.3)
    x = torch.randn(2, 3, 9, 11)
    expected = m(x)
    for converted in (torch.jit.script(m), torch.jit.trace(m, x)):
        torch.testing.assert_close(converted(x), expected, atol=0, rtol=0)
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(m, (x,), path, dynamo=False, opset_version=17)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected.detach(), atol=1e-5, rtol=1e-4)


# ---- config keys ------------------------------------------------------------------------------

def test_config_keys_select_the_variants_in_every_frn_layer():
    model = build(RETINANET, "FRN", *R18, "MODEL.FRN.NUM_GROUPS", 32, "MODEL.FRN.CENTERED", True)
    frns = [m for m in model.modules() if isinstance(m, FilterResponseNorm2d)]
    assert frns and all(m.num_groups == 32 and m.centered and m.impl == "reference" for m in frns)
    default = [m for m in build(RETINANET, "FRN", *R18).modules() if isinstance(m, FilterResponseNorm2d)]
    assert all(m.num_groups == 0 and not m.centered for m in default)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="MODEL.FRN.NUM_GROUPS 7 does not divide"):
        build(RETINANET, "FRN", *R18, "MODEL.FRN.NUM_GROUPS", 7)
    with pytest.raises(ValueError, match="MODEL.FRN.NUM_GROUPS must be 0"):
        FRNOptions(num_groups=-1)
    with pytest.raises(ValueError, match="MODEL.FRN.CENTERED must be True or False"):
        FRNOptions(centered="yes")
    with pytest.raises(ValueError, match="MODEL.FRN.NUM_GROUPS runs in the reference"):
        FRNOptions(impl="op", num_groups=32, centered=True)
    FRNOptions(impl="op", centered=True)  # per channel: the fused centred op


@pytest.mark.parametrize("norm", ["FRN", "GN", "BN"])
@pytest.mark.parametrize("depth_opts", [R18, ()], ids=["R18", "R50"])
def test_zero_init_residual_zeroes_the_last_norm_of_every_branch_for_every_norm(norm, depth_opts):
    model = build(RETINANET, norm, *depth_opts, "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.RESNETS.ZERO_INIT_RESIDUAL", True)
    last = "conv2" if depth_opts else "conv3"
    blocks = [m for m in model.backbone.bottom_up.modules() if hasattr(m, "shortcut")]
    assert len(blocks) == (8 if depth_opts else 16)
    for block in blocks:
        assert torch.count_nonzero(getattr(block, last).norm.weight) == 0
        assert torch.all(block.conv1.norm.weight == 1)
        if block.shortcut is not None:
            assert torch.all(block.shortcut.norm.weight == 1)
    stock = build(RETINANET, norm, *depth_opts, "MODEL.BACKBONE.FREEZE_AT", 0)
    assert all(torch.all(getattr(b, last).norm.weight == 1) for b in stock.backbone.bottom_up.modules()
               if hasattr(b, "shortcut"))


def test_zero_init_residual_makes_each_block_its_shortcut_and_skips_frozen_blocks():
    model = build(RETINANET, "GN", *R18, "MODEL.RESNETS.ZERO_INIT_RESIDUAL", True).eval()  # FREEZE_AT 2
    block = model.backbone.bottom_up.res3[1]  # identity shortcut
    x = torch.randn(1, block.in_channels, 8, 8)
    torch.testing.assert_close(block(x), F.relu(x))
    assert all(torch.all(b.conv2.norm.weight == 1) for b in model.backbone.bottom_up.res2)  # frozen by FREEZE_AT
    with pytest.raises(ValueError, match="all 8 residual branches are frozen"):
        zero_init_residual_norms(build(RETINANET, "FrozenBN", *R18))
    with pytest.raises(ValueError, match=r"learned scale, but backbone.bottom_up.res2.0.conv2.norm is absent"):
        build(RETINANET, "", *R18, "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.RESNETS.ZERO_INIT_RESIDUAL", True)
    cfg = make_cfg(RETINANET, "GN", *R18)
    assert cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL is False

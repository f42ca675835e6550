"""The fused centred op (torch.ops.frn_det.frn_centered / frn_centered_backward, CPU kernels in
frn_det/layers/csrc/cpu/frn_centered_kernel.cpp) against a float64 formula written out here (not
frn_reference), forward and every gradient, per dtype, layout, eps and TLU; its numerics (a plane of
mean 1e3 and std 0.1, constant and 1x1 planes give exactly bias); its paths (fused per plane or
sample, split chunks / row blocks: the NCHW split path is forced by pinning more threads than
planes), bitwise determinism across runs and thread counts; gradcheck, opcheck, torch.compile; and
the layer's wiring (op vs reference, CUDA-less devices).

CPU kernel paths and the tests that reach them:

| path | reached by |
|---|---|
| NCHW fused per plane (planes >= threads, or one chunk) | every test; SHAPES |
| NCHW split chunks (planes < threads, planes of > 4096 elements) | test_split_path_* (threads pinned to 4), test_mean_1e3_* |
| NHWC fused per sample (L * C <= 32768) | SHAPES with channels_last |
| NHWC split row blocks (L * C > 32768) | (2, 8, 70, 70) channels_last, test_threads_*, test_mean_1e3_* |
| 1x1 planes, H*W = 0, N = 0, C = 0 | SHAPES, test_constant_and_1x1_planes_give_exactly_bias, test_empty_* |
| grad_input=False | test_backward_without_grad_input |
"""

import pytest
import torch

from frn_det.layers import FilterResponseNorm2d, frn, frn_reference
from frn_det.layers import ops
from frn_testing import assert_compiled_matches_eager, eps_l_term_scale, make_inputs, num_threads

pytestmark = pytest.mark.skipif(not ops.is_available(), reason=f"frn_det._C not built: {ops.load_error()}")

NAMES = ("x", "weight", "bias", "tau", "eps_l")


def formula(x, weight, bias, tau, eps, eps_l):
    """The centred variant in float64, written out: per plane m = sum(x) / L, v = sum((x - m)^2) / L,
    y = (x - m) / sqrt(v + eps + |eps_l|) * weight + bias, z = y where y >= tau, else tau."""
    x = x.double()
    L = max(x.shape[2] * x.shape[3], 1)
    m = x.sum(dim=(2, 3), keepdim=True) / L
    xc = x - m
    v = (xc * xc).sum(dim=(2, 3), keepdim=True) / L
    eps_eff = eps + (eps_l.double().abs() if eps_l is not None else 0.0)
    y = xc / torch.sqrt(v + eps_eff) * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    if tau is None:
        return y
    t = tau.double().view(1, -1, 1, 1)
    return torch.where(y < t, t, y)  # ties: the gradient goes to y


def op_centered(x, weight, bias, tau, eps, eps_l):
    return torch.ops.frn_det.frn_centered(x, weight, bias, tau, eps, eps_l)[0]


def with_grads(fn, args, grad_out, eps=1e-6):
    out = fn(*args[:4], eps, args[4])
    present = [a for a in args if a is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out) if out.numel() or present else ())
    return out, [next(grads) if a is not None else None for a in args]


def as_float64_leaves(args):
    return [a.detach().double().requires_grad_() if a is not None else None for a in args]


# Relative to each tensor's largest magnitude: fp64 and fp32 from the arithmetic, fp16 / bf16 from
# rounding the results to their spacing (2^-11, 2^-8 relative) and the accumulation in fp32.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_scaled_close(got, ref, tol, name, scale=0.0):
    """Max error within ``tol`` of max|ref|, or of ``scale`` where that is larger (the size of the
    terms a reduction adds: frn_testing.eps_l_term_scale)."""
    assert got.shape == ref.shape, name
    if ref.numel() == 0:
        return
    scale = max(ref.abs().max().item(), scale)
    err = (got.double() - ref).abs().max().item()
    assert err <= tol * max(scale, 1e-300), f"{name}: max error {err:.3g} against a scale of {scale:.3g} (tol {tol})"


def check_against_formula(args, eps=1e-6, seed=1, tol=None):
    x = args[0]
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
    out, grads = with_grads(op_centered, args, grad_out, eps)
    ref, ref_grads = with_grads(formula, as_float64_leaves(args), grad_out.double(), eps)
    assert out.dtype == x.dtype
    if x.dim() == 4 and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last) == (not x.is_contiguous())
    tol = tol or TOL[x.dtype]
    assert_scaled_close(out, ref, tol, "out")
    for name, a, gr, rg in zip(NAMES, args, grads, ref_grads):
        if a is None:
            continue
        assert gr.dtype == a.dtype, name
        floor = eps_l_term_scale(*args, grad_out, centered=True, eps=eps) if name == "eps_l" else 0.0
        assert_scaled_close(gr, rg, max(tol, TOL[a.dtype]), f"grad of {name}", floor)
    return out, grads


# (2, 8, 70, 70) channels_last: samples above the one-task-per-sample size (NHWC row blocks);
# (1, 2, 100, 90): planes of 3 chunks (the split path where threads > 2); (3, 4, 1, 1): 1x1 planes;
# (2, 3, 0, 4): empty planes; (0, 3, 4, 4): an empty batch; (2, 0, 3, 3): no channels.
SHAPES = [(2, 3, 5, 7), (2, 4, 33, 41), (1, 2, 100, 90), (2, 8, 70, 70), (3, 4, 1, 1), (1, 5, 1, 9),
          (2, 3, 0, 4), (0, 3, 4, 4), (2, 0, 3, 3)]
DTYPES = [(torch.float64, None), (torch.float32, None), (torch.float16, None), (torch.float16, torch.float32),
          (torch.bfloat16, torch.float32), (torch.bfloat16, None)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("tlu,learned_eps", [(True, False), (False, True), (True, True)])
def test_float64_forward_and_all_grads_match_the_formula(shape, channels_last, tlu, learned_eps):
    args = make_inputs(shape, tlu=tlu, learned_eps=learned_eps, channels_last=channels_last)
    with torch.no_grad():
        args[0] += 1.5  # a mean to subtract
    check_against_formula(args)


@pytest.mark.parametrize("dtype,param_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 4, 33, 41), (2, 8, 70, 70)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("tlu,learned_eps", [(True, False), (False, True), (True, True)])
def test_every_dtype_matches_the_formula_on_the_same_rounded_input(dtype, param_dtype, shape, channels_last, tlu,
                                                                   learned_eps):
    args = make_inputs(shape, dtype=dtype, param_dtype=param_dtype, tlu=tlu, learned_eps=learned_eps,
                       channels_last=channels_last, requires_grad=False)
    with torch.no_grad():
        args[0] = (args[0].double() * 0.7 + 3.0).to(dtype)  # mean 3, std 1.4
        if channels_last:
            args[0] = args[0].contiguous(memory_format=torch.channels_last)
    args = [a.requires_grad_() if a is not None else None for a in args]
    check_against_formula(args)


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("shape,channels_last", [((1, 2, 100, 90), False), ((2, 3, 64, 64), False),
                                                 ((2, 3, 20, 20), True), ((2, 8, 70, 70), True)])
def test_mean_1e3_std_0p1_plane_is_within_a_few_ulp(shape, channels_last, threads):
    """fp32 planes of mean 1e3 and std 0.1: E[x^2] - E[x]^2 in fp32 would lose every digit, and an
    fp32 mean alone is off by up to 3e-4 of a std. Against float64 on the same rounded input the
    output is within a few fp32 ulp of its scale, and the gradients within 1e-5 of theirs."""
    g = torch.Generator().manual_seed(0)
    x = (1e3 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w = (1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)).float()
    b = (0.3 * torch.randn(C, generator=g, dtype=torch.float64)).float()
    t = (0.3 * torch.randn(C, generator=g, dtype=torch.float64)).float()
    grad_out = torch.randn(shape, generator=g)
    for tau, eps_l in ((None, None), (t, torch.tensor(1e-4))):
        args = [a.clone().requires_grad_() if a is not None else None for a in (x, w, b, tau, eps_l)]
        with num_threads(threads):
            out, grads = with_grads(op_centered, args, grad_out)
        ref, ref_grads = with_grads(formula, as_float64_leaves(args), grad_out.double())
        scale = ref.abs().max().item()
        ulp = torch.finfo(torch.float32).eps * 2.0 ** torch.tensor(scale).log2().floor().item()
        err_ulp = (out.double() - ref).abs().max().item() / ulp
        assert err_ulp <= 4, f"output off by {err_ulp:.2f} ulp of its scale {scale:.3g}"
        for name, a, gr, rg in zip(NAMES, args, grads, ref_grads):
            if a is not None:
                assert_scaled_close(gr, rg, 1e-5, f"grad of {name}")
        _, mean, _ = torch.ops.frn_det.frn_centered(x, w, b, tau, 1e-6, eps_l)
        assert mean.dtype == torch.float64
        torch.testing.assert_close(mean, x.double().mean(dim=(2, 3)), atol=1e-7, rtol=0)  # 1e-6 std


@pytest.mark.parametrize("offset", [1.0, 100.0, 400.0])
@pytest.mark.parametrize("row", [0, 10], ids=["plane_shift", "block_shift"])
def test_an_outlier_as_the_shift_keeps_the_precision(offset, row):
    """The kernels shift each plane by its first element and each block of 8 values of a lane by the
    block's first: an outlier there (up to 4000 std from the mean; row 10, column 0 starts a block in
    both layouts) makes the shifted values large, and the result stays within 2e-6 of the output's
    scale."""
    g = torch.Generator().manual_seed(1)
    x = (1e3 + 0.1 * torch.randn((2, 3, 64, 64), generator=g, dtype=torch.float64)).float()
    x[:, :, row, 0] += offset
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        out = op_centered(xl, torch.ones(3), torch.zeros(3), None, 1e-6, None)
        assert_scaled_close(out, formula(xl, torch.ones(3), torch.zeros(3), None, 1e-6, None), 2e-6, "out")


@pytest.mark.parametrize("dtype,center,std", [(torch.float16, 100.0, 0.5), (torch.bfloat16, 100.0, 4.0)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_half_planes_with_a_large_mean_round_once(dtype, center, std, channels_last):
    """fp16 / bf16 planes whose mean is large against their spread (as far as their spacing allows:
    fp16 steps by 1/16 at 100, bf16 by 1/2): the output is the float64 formula's on the same rounded
    input, rounded once to the dtype (within one ulp of the output's scale)."""
    g = torch.Generator().manual_seed(0)
    x = (center + std * torch.randn((2, 3, 24, 24), generator=g, dtype=torch.float64)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(3), torch.zeros(3)
    out = op_centered(x, w, b, None, 1e-6, None)
    ref = formula(x, w, b, None, 1e-6, None)
    scale = ref.abs().max().item()
    ulp = torch.finfo(dtype).eps * 2.0 ** torch.tensor(scale).log2().floor().item()
    assert (out.double() - ref).abs().max().item() <= ulp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,channels_last,threads", [((2, 3, 5, 7), False, 1), ((2, 3, 5, 7), True, 1),
                                                         ((1, 2, 100, 90), False, 4), ((2, 8, 70, 70), True, 2),
                                                         ((3, 4, 1, 1), False, 1)])
def test_constant_and_1x1_planes_give_exactly_bias(dtype, shape, channels_last, threads):
    """Variance 0: the output is exactly bias before the TLU (documented in ops.py), whatever the
    constant (1x1 planes are constant); the gradient of weight is 0, that of x weight * rstd *
    (grad_out - its plane mean), exactly 0 on 1x1 planes."""
    C = shape[1]
    values = torch.tensor([1e3 + 0.1, -3.7, 0.0, 1e-20, 7.0, 250.0, -1e4, 0.5], dtype=torch.float64)[:C]
    x = values.view(1, C, 1, 1).expand(shape).to(dtype).contiguous()
    if shape[2] * shape[3] == 1:
        x = torch.randn(shape, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.linspace(0.5, 2.0, C, dtype=dtype, requires_grad=True)
    b = torch.linspace(-0.3, 0.8, C, dtype=dtype, requires_grad=True)
    low_tau = (b.detach() - 1).requires_grad_()
    for tau in (None, low_tau):
        with num_threads(threads):
            out = torch.ops.frn_det.frn_centered(x, w, b, tau, 1e-6, None)[0]
            assert torch.equal(out, b.detach().view(1, -1, 1, 1).expand(shape))
            grad_out = torch.randn(shape).to(dtype)
            gx, gw, gb = torch.autograd.grad(out, (x, w, b), grad_out)
        assert torch.equal(gw, torch.zeros_like(gw))
        if shape[2] * shape[3] == 1:
            assert torch.equal(gx, torch.zeros_like(gx))
        else:
            g64 = grad_out.double()
            expected = w.detach().double().view(1, -1, 1, 1) * 1e3 * (g64 - g64.mean(dim=(2, 3), keepdim=True))
            assert_scaled_close(gx, expected, TOL[dtype], "grad of x")
        torch.testing.assert_close(gb.double(), grad_out.double().sum(dim=(0, 2, 3)), atol=1e-2, rtol=1e-2)
    # and with the TLU cutting: max(bias, tau) exactly
    high_tau = (b.detach() + 0.25).requires_grad_()
    out = torch.ops.frn_det.frn_centered(x, w, b, high_tau, 1e-6, None)[0]
    assert torch.equal(out, high_tau.detach().view(1, -1, 1, 1).expand(shape))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_empty_batch_and_empty_planes(channels_last):
    for shape in ((0, 3, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)):
        x, w, b, t, e = make_inputs(shape, dtype=torch.float32, learned_eps=True, channels_last=channels_last)
        out, mean, rstd = torch.ops.frn_det.frn_centered(x, w, b, t, 1e-6, e)
        assert out.shape == shape and mean.shape == rstd.shape == shape[:2]
        assert mean.dtype == torch.float64 and rstd.dtype == torch.float32
        grads = torch.autograd.grad(out, (x, w, b, t, e), torch.ones_like(out))
        assert grads[0].shape == shape
        for gr in grads[1:]:
            assert torch.equal(gr, torch.zeros_like(gr))


def test_backward_without_grad_input():
    x, w, b, t, e = make_inputs((2, 3, 6, 5), dtype=torch.float32, learned_eps=True, requires_grad=False)
    out, mean, rstd = torch.ops.frn_det.frn_centered(x, w, b, t, 1e-6, e)
    g = torch.randn_like(out)
    full = torch.ops.frn_det.frn_centered_backward(g, x, w, b, t, mean, rstd, e, True)
    params_only = torch.ops.frn_det.frn_centered_backward(g, x, w, b, t, mean, rstd, e, False)
    assert params_only[0].shape == (0,)
    for a, b_ in zip(full[1:], params_only[1:]):
        assert torch.equal(a, b_)
    # through autograd: only the parameters need gradients
    w2 = w.clone().requires_grad_()
    out2 = torch.ops.frn_det.frn_centered(x, w2, b, t, 1e-6, e)[0]
    (gw,) = torch.autograd.grad(out2, (w2,), g)
    assert torch.equal(gw, full[1])


def _run_all(x, w, b, t, e, g):
    out, mean, rstd = torch.ops.frn_det.frn_centered(x, w, b, t, 1e-6, e)
    grads = torch.ops.frn_det.frn_centered_backward(g, x, w, b, t, mean, rstd, e, True)
    return (out, mean, rstd) + tuple(grads)


@pytest.mark.parametrize("shape,channels_last", [((1, 2, 100, 90), False), ((1, 3, 70, 70), False),
                                                 ((2, 8, 70, 70), True), ((3, 4, 9, 9), True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_and_runs_give_bitwise_equal_results(shape, channels_last, dtype):
    """1 thread (fused per plane), 2 and 4 threads (fewer NCHW planes than threads: split chunks),
    and a second run: bitwise the same, statistics and gradients included."""
    x, w, b, t, e = make_inputs(shape, dtype=dtype, param_dtype=torch.float32, learned_eps=True,
                                channels_last=channels_last, requires_grad=False)
    with torch.no_grad():
        x = (x.double() + 40).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape).to(dtype)
    results, plans = [], []
    for n in (1, 2, 4, 4):
        with num_threads(n):
            plans.append(torch.ops.frn_det._cpu_plan(x))
            results.append(_run_all(x, w, b, t, e, g))
    if not channels_last and shape[0] * shape[1] < 4:  # the paths compared
        assert plans == ["planes", "split" if shape[0] * shape[1] < 2 else "planes", "split", "split"]
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


def test_split_path_matches_the_formula():
    """The NCHW split path itself (4 threads, 2 planes of 3 chunks), against the formula."""
    for dtype in (torch.float64, torch.float32):
        args = make_inputs((1, 2, 100, 90), dtype=dtype, learned_eps=True)
        with torch.no_grad():
            args[0] += 5.0
        with num_threads(4):
            assert torch.ops.frn_det._cpu_plan(args[0]) == "split"
            check_against_formula(args)


def test_nan_stays_in_its_plane():
    x, w, b, t, _ = make_inputs((2, 3, 6, 6), dtype=torch.float32, requires_grad=False)
    x[0, 1, 2, 3] = float("nan")
    x.requires_grad_()
    out = torch.ops.frn_det.frn_centered(x, w, b, t, 1e-6, None)[0]
    (gx,) = torch.autograd.grad(out, (x,), torch.ones_like(out))
    assert torch.isnan(out[0, 1]).all() and torch.isnan(gx[0, 1]).all()
    finite = torch.ones(2, 3, dtype=torch.bool)
    finite[0, 1] = False
    assert torch.isfinite(out[finite]).all() and torch.isfinite(gx[finite]).all()


def test_tie_rule_gradient_goes_to_y():
    # Planes of +-1 (mean 0, variance 1) and zeros at which y == bias == tau: those gradients go to y.
    row = torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0, 0.0], dtype=torch.float64)
    x = row.repeat(2, 2, 3, 1).requires_grad_()  # (2, 2, 3, 6)
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    b = torch.full((2,), 0.25, dtype=torch.float64, requires_grad=True)
    t = torch.full((2,), 0.25, dtype=torch.float64, requires_grad=True)
    g = torch.arange(1.0, 1.0 + x.numel(), dtype=torch.float64).reshape(x.shape)
    out = torch.ops.frn_det.frn_centered(x, w, b, t, 0.0, None)[0]
    gt, gb = torch.autograd.grad(out, (t, b), g)
    xd = x.detach()
    assert (out.detach()[xd == 0] == 0.25).all()
    torch.testing.assert_close(gt, (g * (xd < 0)).sum(dim=(0, 2, 3)))
    torch.testing.assert_close(gb, (g * (xd >= 0)).sum(dim=(0, 2, 3)))


def test_gradcheck_float64():
    x, w, b, t, e = make_inputs((2, 3, 3, 4), learned_eps=True)
    with torch.no_grad():
        t -= 3.0  # away from the TLU's kink, where finite differences disagree
    f = lambda *a: op_centered(a[0], a[1], a[2], a[3], 1e-6, a[4])  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b, t, e), eps=1e-6, atol=1e-6)
    # Planes of 2 elements, small spread: eps_l has a sizeable effect, so its gradient is really checked.
    x2, w2, b2, _, e2 = make_inputs((2, 3, 1, 2), tlu=False, learned_eps=True, seed=3, scale=0.3)
    f2 = lambda *a: op_centered(a[0], a[1], a[2], None, 1e-6, a[3])  # noqa: E731
    assert torch.autograd.gradcheck(f2, (x2, w2, b2, e2), eps=1e-6, atol=1e-6)
    # channels_last, with the TLU's kink inside the data, and a negative eps_l (the sign of its gradient)
    x3, w3, b3, t3, _ = make_inputs((2, 3, 4, 3), channels_last=True, seed=5)
    e3 = torch.tensor(-0.02, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: op_centered(a[0], a[1], a[2], a[3], 1e-6, a[4]), (x3, w3, b3, t3, e3),
                                    eps=1e-7, atol=1e-5)


def test_double_backward_is_refused():
    x, w, b, t, _ = make_inputs((1, 2, 3, 3))
    out = torch.ops.frn_det.frn_centered(x, w, b, t, 1e-6, None)[0]
    (gx,) = torch.autograd.grad(out.square().sum(), (x,), create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


def _opcheck_samples():
    samples = []
    for shape, kw in [((2, 3, 4, 5), {}), ((2, 3, 4, 5), {"channels_last": True, "learned_eps": True}),
                      ((2, 3, 4, 5), {"tlu": False}), ((0, 3, 2, 2), {}), ((2, 3, 1, 1), {"learned_eps": True}),
                      ((2, 3, 0, 2), {}), ((2, 3, 4, 5), {"dtype": torch.float32}),
                      ((2, 3, 4, 5), {"dtype": torch.bfloat16, "param_dtype": torch.float32})]:
        x, w, b, t, e = make_inputs(shape, **kw)
        samples.append((x, w, b, t, 1e-6, e))
    return samples


def test_opcheck():
    for args in _opcheck_samples():
        torch.library.opcheck(torch.ops.frn_det.frn_centered.default, args)
        x, w, b, t, eps, e = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        _, mean, rstd = torch.ops.frn_det.frn_centered.default(x, w, b, t, eps, e)
        for grad_input in (True, False):
            bargs = (torch.randn_like(x), x, w, b, t, mean, rstd, e, grad_input)
            torch.library.opcheck(torch.ops.frn_det.frn_centered_backward.default, bargs)


def test_backward_checks_mean_and_rstd_on_the_op_and_the_fake_kernel():
    x, w, b, t, e = make_inputs((2, 3, 4, 4), dtype=torch.float32, requires_grad=False)
    _, mean, rstd = torch.ops.frn_det.frn_centered(x, w, b, t, 1e-6, e)
    g = torch.randn_like(x)
    bad = [(dict(mean=mean.float()), TypeError, "frn_centered_backward: mean must be "),
           (dict(mean=mean[:1]), ValueError, r"frn_centered_backward: mean must have shape \(N, C\)"),
           (dict(rstd=rstd.double()), TypeError, "frn_centered_backward: rstd must be "),
           (dict(g=g[:1]), ValueError, "frn_centered_backward: grad_out has shape")]
    for device in ("cpu", "meta"):
        for change, error, message in bad:
            kw = dict(g=g, mean=mean, rstd=rstd)
            kw.update(change)
            args = [a.to(device) if isinstance(a, torch.Tensor) else a
                    for a in (kw["g"], x, w, b, t, kw["mean"], kw["rstd"], e, True)]
            with pytest.raises(error, match=message):
                torch.ops.frn_det.frn_centered_backward(*args)
    with pytest.raises(ValueError, match="frn: weight must have shape"):
        torch.ops.frn_det.frn_centered(x, w[:2], b, t, 1e-6, e)


# ---- the layer and the functional -------------------------------------------------------------

@pytest.mark.parametrize("learned_eps", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_layer_on_the_op_agrees_with_the_reference(learned_eps, channels_last):
    torch.manual_seed(0)
    layers = {impl: FilterResponseNorm2d(6, learned_eps=learned_eps, centered=True, impl=impl)
              for impl in ("op", "reference", "auto")}
    assert layers["op"].impl == layers["auto"].impl == "op" and layers["reference"].impl == "reference"
    with torch.no_grad():
        for p in layers["op"].parameters():
            p.uniform_(-0.5, 0.5) if p.dim() else p.fill_(0.02)
    for layer in layers.values():
        layer.load_state_dict(layers["op"].state_dict())  # a checkpoint loads the same under both
    x = torch.randn(3, 6, 9, 11) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    results = {}
    for impl, layer in layers.items():
        xi = x.clone().requires_grad_()
        out = layer(xi)
        params = list(layer.parameters())
        grads = torch.autograd.grad(out, [xi] + params, g)
        results[impl] = [out.detach()] + list(grads)
    for a, b_ in zip(results["op"], results["auto"]):
        assert torch.equal(a, b_)
    for a, b_ in zip(results["op"], results["reference"]):
        torch.testing.assert_close(a, b_, atol=2e-5, rtol=2e-5)
    assert results["op"][0].is_contiguous(memory_format=torch.channels_last) == channels_last


def test_functional_runs_the_op_on_cpu(monkeypatch):
    x, w, b, t, e = make_inputs((2, 3, 5, 5), dtype=torch.float32, learned_eps=True, requires_grad=False)
    calls = []
    real = torch.ops.frn_det.frn_centered.default

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    from frn_det.layers import filter_response_norm as module

    monkeypatch.setattr(module, "_frn_centered_fused", lambda *a: spy(*a[:4], float(a[4]), a[5])[0])
    for impl in ("op", "auto", None):
        out = frn(x, w, b, t, 1e-6, e, impl=impl, centered=True)
        torch.testing.assert_close(out, frn_reference(x, w, b, t, 1e-6, e, centered=True), atol=1e-5, rtol=1e-5)
    assert len(calls) == 3
    frn(x, w, b, t, 1e-6, e, impl="reference", centered=True)
    frn(x, w, b, t, 1e-6, e, impl="auto", num_groups=3, centered=True)
    assert len(calls) == 3  # the reference and grouped variants do not run the op


def test_devices_without_centred_kernels_run_the_reference_or_say_so():
    """CUDA has no centred kernels yet: "auto" runs the reference there, "op" raises
    NotImplementedError (shown here on the meta device, which has none either)."""
    x, w, b, t, e = [a.to("meta") for a in make_inputs((2, 3, 5, 5), dtype=torch.float32, learned_eps=True,
                                                        requires_grad=False)]
    assert frn(x, w, b, t, 1e-6, e, impl="auto", centered=True).shape == x.shape
    with pytest.raises(NotImplementedError, match="CPU only"):
        frn(x, w, b, t, 1e-6, e, impl="op", centered=True)
    layer = FilterResponseNorm2d(3, learned_eps=True, centered=True, impl="auto").to("meta")
    assert layer(x).shape == x.shape
    strict = FilterResponseNorm2d(3, learned_eps=True, centered=True, impl="op").to("meta")
    with pytest.raises(NotImplementedError, match="CPU only"):
        strict(x)
    # grouped variants stay on the reference, and "op" is refused for them
    assert FilterResponseNorm2d(6, num_groups=2, centered=True, impl="auto").impl == "reference"
    with pytest.raises(ValueError, match="num_groups runs in the reference"):
        FilterResponseNorm2d(6, num_groups=2, centered=True, impl="op")


def test_torch_compile_fullgraph_matches_eager():
    assert_compiled_matches_eager(FilterResponseNorm2d(4, learned_eps=True, centered=True, impl="op"))


def test_layer_scripts_traces_and_exports():
    """TorchScript (script and trace) runs the op as eager does; ONNX export and torch.export record
    the reference's operators (no custom op in the exported graph)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), FilterResponseNorm2d(6, learned_eps=True, centered=True)).eval()
    with torch.no_grad():
        m[1].tau.uniform_(-0.3, 0.3)
    assert m[1].impl == "op"
    x = torch.randn(2, 3, 9, 11)
    expected = m(x)
    for converted in (torch.jit.script(m), torch.jit.trace(m, x)):
        assert torch.equal(converted(x), expected)
    exported = torch.export.export(m, (x,))
    assert "frn_centered" not in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_layer_exports_to_onnx_with_standard_operators(tmp_path, dynamo):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), FilterResponseNorm2d(6, learned_eps=True, centered=True),
                            torch.nn.Conv2d(6, 4, 1), FilterResponseNorm2d(4, tlu=False, centered=True)).eval()
    with torch.no_grad():
        m[1].tau.uniform_(-0.3, 0.3)
    assert m[1].impl == m[3].impl == "op"
    x = torch.randn(2, 3, 10, 12)
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(m, (x,), path, dynamo=dynamo, **({} if dynamo else {"opset_version": 17}))
    assert {n.domain for n in onnx.load(path).graph.node} <= {""}, "no custom ONNX domain"
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), m(x).detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape,channels_last", [((2, 3, 5, 7), False), ((2, 3, 5, 7), True), ((3, 4, 1, 2), False)])
def test_float64_gradients_equal_autograd_of_frn_reference(shape, channels_last):
    """Every gradient, eps_l's included (positive and negative eps_l), against torch's autograd
    through frn_reference (centered=True) in float64."""
    for eps_l_value in (0.05, -0.03):
        x, w, b, t, _ = make_inputs(shape, channels_last=channels_last, seed=7)
        e = torch.tensor(eps_l_value, dtype=torch.float64, requires_grad=True)
        args = [x, w, b, t, e]
        g = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        _, grads = with_grads(op_centered, args, g)
        ref_args = as_float64_leaves(args)
        _, ref_grads = with_grads(lambda *a: frn_reference(*a, centered=True), ref_args, g)
        for name, gr, rg in zip(NAMES, grads, ref_grads):
            assert_scaled_close(gr, rg, 1e-12, f"grad of {name}")

"""Shared helpers of the op tests (CPU and CUDA): inputs, gradients, comparison with the float64 reference."""
import contextlib

import torch

from frn_det.layers import frn, frn_reference
from kernel_paths import set_test_limits


def make_inputs(shape, dtype=torch.float64, tlu=True, learned_eps=False, channels_last=False, device="cpu",
                param_dtype=None, seed=0, scale=2.0, requires_grad=True):
    """x, weight, bias, tau (or None), eps_l (or None); parameters are random so every term matters."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    pd = param_dtype or dtype
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)).to(pd)
    bias = (0.3 * torch.randn(C, generator=g, dtype=torch.float64)).to(pd)
    tau = (0.3 * torch.randn(C, generator=g, dtype=torch.float64)).to(pd) if tlu else None
    eps_l = torch.tensor(0.05, dtype=pd) if learned_eps else None
    out = [x, weight, bias, tau, eps_l]
    out = [t.to(device) if t is not None else None for t in out]
    if requires_grad:
        out = [t.detach().requires_grad_() if t is not None else None for t in out]
    return out


@contextlib.contextmanager
def num_threads(n):
    """torch's intra-op threads set to ``n`` within the block: the CPU kernels' paths depend on it
    (torch.ops.frn_det._cpu_plan says which one runs), and make test gives each worker one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_compiled_matches_eager(layer):
    """Conv + ``layer`` (4 channels) under torch.compile(fullgraph=True): output, input and
    parameter gradients as in eager mode."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), layer)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].tau.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, fullgraph=True)
    outs = []
    for fn in (model, compiled):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.square().sum().backward()
        outs.append([out.detach(), xi.grad] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def run_with_grads(fn, x, weight, bias, tau, eps_l, grad_out, eps=1e-6):
    """Output and gradients of every tensor argument (None where the argument is None)."""
    out = fn(x, weight, bias, tau, eps, eps_l)
    args = [t for t in (x, weight, bias, tau, eps_l) if t is not None]
    grads = iter(torch.autograd.grad(out, args, grad_out))
    return out, [next(grads) if t is not None else None for t in (x, weight, bias, tau, eps_l)]


def op_fn(*args):
    return frn(*args, impl="op")


def assert_matches_reference(x, weight, bias, tau, eps_l, atol, rtol, seed=1):
    """Op vs reference on the same inputs (the reference upcast to float64 on the CPU), each tensor
    to its own tolerance (:func:`assert_tensor_close`): ``atol`` / ``rtol`` for the output and the
    tensors in x's dtype, fp32's for fp32 parameter gradients of half inputs."""
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype).to(x.device)
    out, grads = run_with_grads(op_fn, x, weight, bias, tau, eps_l, grad_out)

    def to64(t):
        return t.detach().to("cpu", torch.float64).requires_grad_() if t is not None else None

    ref_args = [to64(t) for t in (x, weight, bias, tau, eps_l)]
    ref, ref_grads = run_with_grads(frn_reference, *ref_args, grad_out.to("cpu", torch.float64))
    assert out.dtype == x.dtype and out.shape == x.shape and out.device == x.device
    assert_tensor_close("output", out, ref, atol, rtol)
    assert_grads_close((x, weight, bias, tau, eps_l), grads, ref_grads, atol, rtol,
                       grad_x_scale=grad_x_term_scale(x, weight, eps_l, grad_out),
                       grad_eps_l_scale=eps_l_term_scale(x, weight, bias, tau, eps_l, grad_out))
    return out, grads


def grad_x_term_scale(x, weight, eps_l, grad_out, eps=1e-6):
    """The largest |grad_out * weight * rstd| (float64): grad_x = weight * rstd * (grad_out - x_hat *
    mean(grad_out * x_hat)) is a difference of terms of this size, so no kernel in x's precision
    gets it closer than their rounding. Where x_hat^2 is near 1 (a 1x1 plane) the difference is
    far smaller than its terms; elsewhere it is of their size."""
    if x.numel() == 0:
        return 0.0
    _, rstd = _planes64(x, eps, eps_l)
    return float((grad_out.to("cpu", torch.float64) * _per_channel64(weight) * rstd).abs().max())


def _per_channel64(t):
    return t.detach().to("cpu", torch.float64).view(1, -1, 1, 1) if t is not None else None


def _planes64(x, eps, eps_l, centered=False):
    """x_c (x, or x minus its plane's mean when ``centered``) and the per-plane rstd, in float64."""
    x64 = x.detach().to("cpu", torch.float64)
    xc = x64 - x64.mean(dim=(2, 3), keepdim=True) if centered else x64
    eps_total = eps + (float(eps_l.detach().abs()) if eps_l is not None else 0.0)
    return xc, torch.rsqrt(xc.square().mean(dim=(2, 3), keepdim=True) + eps_total)


def eps_l_term_scale(x, weight, bias, tau, eps_l, grad_out, centered=False, eps=1e-6):
    """The sum of the magnitudes of grad_eps_l's terms (float64): grad_eps_l = sum over planes of
    -sign(eps_l) / 2 * weight * rstd^3 * sum(dy * x_c) (x_c = x, or x - mean when ``centered``) adds
    terms of both signs, and its error is a rounding of their sum of magnitudes, which can exceed
    the result a hundredfold. 0 without eps_l."""
    if eps_l is None or x.numel() == 0:
        return 0.0
    xc, rstd = _planes64(x, eps, eps_l, centered)
    w64, b64, t64 = (_per_channel64(t) for t in (weight, bias, tau))
    y = xc * rstd * w64 + b64
    dy = grad_out.to("cpu", torch.float64) * ((y >= t64) if tau is not None else 1.0)
    return float((0.5 * w64.abs() * rstd**3 * (dy * xc).abs()).sum())


# fp32 parameter gradients of fp16 / bf16 inputs (as under autocast) sum in fp32: held to fp32's
# accuracy, not to the tolerance of the half tensors (half-precision accumulation errs ~1e-3).
FP32_PARAM_GRAD_TOL = (1e-4, 1e-4)


def assert_tensor_close(name, got, ref, atol, rtol, scale=0.0):
    """``got`` against the float64 ``ref``: |got - ref| <= atol * max(max|ref|, scale) + rtol * |ref|,
    so that ``atol`` is relative to the tensor's own magnitude (a gradient of 3e-4 is not passed by an
    absolute 2e-2, as a zero gradient would be), or to that of the terms it is computed from
    (``scale``) where those are larger."""
    scale = max(float(ref.detach().abs().max()) if ref.numel() else 0.0, scale)
    torch.testing.assert_close(got.to("cpu", torch.float64), ref, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{name} (largest magnitude {scale:.3g}): {m}")


def assert_grads_close(inputs, grads, ref_grads, atol, rtol, grad_x_scale=0.0, grad_eps_l_scale=0.0):
    """Gradients of (x, weight, bias, tau, eps_l) in their inputs' dtypes and close to the float64
    reference's (entries whose input is None are skipped); fp32 parameter gradients of half inputs
    to FP32_PARAM_GRAD_TOL; grad_x's and grad_eps_l's atol relative to at least ``grad_x_scale``
    and ``grad_eps_l_scale`` (grad_x_term_scale, eps_l_term_scale)."""
    floors = {"x": grad_x_scale, "eps_l": grad_eps_l_scale}
    half_x = inputs[0].dtype in (torch.float16, torch.bfloat16)
    for name, t, g_op, g_ref in zip(("x", "weight", "bias", "tau", "eps_l"), inputs, grads, ref_grads):
        if t is None:
            continue
        assert g_op.dtype == t.dtype, name
        tol = FP32_PARAM_GRAD_TOL if half_x and t.dtype == torch.float32 else (atol, rtol)
        assert_tensor_close(f"grad of {name}", g_op, g_ref, *tol, scale=floors.get(name, 0.0))


def opcheck_samples(device):
    samples = []
    for shape, kw in [((2, 3, 4, 5), {}), ((2, 3, 4, 5), {"channels_last": True, "learned_eps": True}),
                      ((2, 3, 4, 5), {"tlu": False}), ((0, 3, 2, 2), {}), ((2, 3, 1, 1), {"learned_eps": True}),
                      ((2, 3, 4, 5), {"dtype": torch.float32, "param_dtype": torch.float32}),
                      ((2, 3, 4, 5), {"dtype": torch.bfloat16, "param_dtype": torch.float32})]:
        x, w, b, t, e = make_inputs(shape, device=device, **kw)
        samples.append((x, w, b, t, 1e-6, e))
    return samples


def opcheck_all(device):
    for args in opcheck_samples(device):
        torch.library.opcheck(torch.ops.frn_det.frn.default, args)
        x, w, b, t, eps, e = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        _, rstd = torch.ops.frn_det.frn.default(x, w, b, t, eps, e)
        for grad_input in (True, False):
            bargs = (torch.randn_like(x), x, w, b, t, rstd, e, grad_input)
            torch.library.opcheck(torch.ops.frn_det.frn_backward.default, bargs)


@contextlib.contextmanager
def cuda_test_limits(max_grid=0, force_int64=False):
    """Lower the CUDA launchers' grid cap / force their 64-bit index kernels (frn.h TestLimits)."""
    set_test_limits(max_grid, force_int64)
    try:
        yield
    finally:
        set_test_limits(0, False)


def paper_frn(x, weight, bias, tau, eps, eps_l=None):
    """The paper's FRN + TLU (arXiv 1911.09737, Algorithm 1) written out in float64, apart from
    frn_reference: nu^2 = mean over H, W of x^2; x_hat = x / sqrt(nu^2 + eps (+ |eps_l|, the
    learned part)); y = gamma * x_hat + beta; z = max(y, tau). An oracle for the op and the reference alike."""
    x = x.double()
    per_channel = [t.double().view(1, -1, 1, 1) if t is not None else None for t in (weight, bias, tau)]
    nu2 = (x * x).mean(dim=(2, 3), keepdim=True)
    y = per_channel[0] * x / torch.sqrt(nu2 + eps + (eps_l.double().abs() if eps_l is not None else 0.0)) + per_channel[1]
    return torch.maximum(y, per_channel[2]) if tau is not None else y


def impl_params():
    """pytest parameters for both implementations; the op's is a recorded skip where frn_det._C is not built."""
    import pytest

    from frn_det.layers import ops

    return ["reference", pytest.param("op", marks=pytest.mark.skipif(not ops.is_available(),
                                                                      reason=f"frn_det._C is not built: {ops.load_error()}"))]

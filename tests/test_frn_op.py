"""The fused FRN op (torch.ops.frn_det.frn / frn_backward) against the plain-PyTorch reference, on
CPU and, where a GPU is visible, on CUDA (FRN_DET_REQUIRE_CUDA=1 makes the CUDA tests fail instead
of skipping without one; see tests/conftest.py).

CUDA kernel paths (frn_det/layers/csrc/cuda/frn_kernel.cu) and the tests that reach them; every
test compares forward and all gradients with the float64 reference unless it says otherwise:

| path | kernel(s) | reached by |
|---|---|---|
| warp per plane, 16-byte loads (L % (16 / itemsize) == 0) | frn_*_plane_kernel<T, 32, 16/size> | test_cuda_paths_match_float64_reference[warp_vec-*] |
| warp per plane, scalar loads | frn_*_plane_kernel<T, 32, 1> | [warp_scalar-*] (7x7), test_cuda_misaligned_and_strided_views (x or grad_out misaligned) |
| partly filled warp groups (P % 8 != 0) | same | [warp_partial-*] (13 planes) |
| block per plane, 16-byte loads | frn_*_plane_kernel<T, 256, 16/size> | [block_vec-*] |
| block per plane, scalar loads (L = 1025) | frn_*_plane_kernel<T, 256, 1> | [block_scalar-*] |
| grid-stride loops: several planes per block / per warp, stats and finalize loops past the y/z grid cap, the parameter-gradient loop over channels | all, with the grid capped at 1 and 2 blocks | test_cuda_grid_stride_loops (also: capped == uncapped, bitwise) |
| split NCHW: partial sums, finalize, apply (int32 indices) | frn_stats_nchw_kernel, frn_finalize_kernel, frn_apply_kernel | [split_nchw-*] |
| split NHWC (every channels_last input with C > 1, H*W > 1) | frn_stats_nhwc_kernel, ... | [*-channels_last-*] |
| apply kernels with int64 indices | frn_apply_kernel<.., int64_t> | test_cuda_int64_apply_kernels |
| parameter-gradient epilogue, eps_l gradient | frn_param_grads_kernel, frn_eps_grad_kernel | every backward; learned eps in the paths test |
| grad_input=False | every backward path | test_cuda_backward_without_grad_input |
| H*W = 0 with N*C > 0 (also with eps 0); N = 0; C = 0; 1x1 planes | | [empty_plane-*], [empty_batch-*], [empty_channels-*], [one_by_one-*], test_empty_planes_with_eps_zero_give_zero_parameter_gradients |
| rstd correctly rounded (eps + abs(eps_l) rounded as on CPU) | | test_one_element_planes_give_the_correctly_rounded_rstd |
| NaN confinement, NaN propagation through the TLU | every path | test_cuda_nan_stays_in_its_plane |
| tie rule (y == tau: gradient to y) | warp, block, split NCHW / NHWC | test_cuda_tie_rule |
| batch independence | every path | test_cuda_batch_independence |
| bitwise run-to-run determinism | every path | test_cuda_runs_are_bitwise_identical |
| non-default stream, second GPU | | test_cuda_non_default_stream, test_cuda_second_device |
| resident planes (opt-in: ops.cuda_resident_planes), one block per plane, 16-byte / scalar loads | frn_resident_kernel<T, 16/size or 1, 1 or 3, false> | [resident_vec-*], [resident_scalar-*] and every test parametrized by path; test_cuda_misaligned_and_strided_views |
| resident planes in a thread-block cluster (sm_90+), the largest shares, planes too large (split) | frn_resident_kernel<T, .., true> | [resident_cluster-*], [resident_max-*]; test_cuda_resident_plans (which path each shape and dtype takes) |
| resident grid-stride loops (several planes per cluster) | | test_cuda_grid_stride_loops |

Tests parametrized by `path` run the RESIDENT_PATHS shapes with resident planes on (the autouse
fixture below), the CUDA_PATHS shapes with the default setting.
"""
import os
import sys

import numpy as np

import pytest
import torch

from frn_det.layers import frn, frn_reference
from frn_det.layers import ops
from kernel_paths import CUDA_PATHS, RESIDENT_PATHS, RESIDENT_PLANS_SM90, kernel_setting
from frn_testing import (assert_compiled_matches_eager, assert_grads_close, assert_matches_reference, cuda_test_limits,
                         make_inputs, num_threads, opcheck_all, run_with_grads)

from frn_det.layers import filter_response_norm as frn_module

# Without the extension the op tests skip, unless a CUDA run was required (conftest.py then fails them).
pytestmark = pytest.mark.skipif(not ops.is_available() and os.environ.get("FRN_DET_REQUIRE_CUDA") != "1",
                                reason=f"frn_det._C not built: {ops.load_error()}")


# ---- float64 correctness ---------------------------------------------------------------------

# (1, 1, 90, 90): one plane of 2 chunks (split across threads where there are 2+: make test gives a
# worker one, so test_split_plane_path_matches_reference pins 4);
# (2, 8, 70, 70): channels_last samples above the one-task-per-sample size, split into row blocks.
# (2, 3, 0, 4): empty planes (no output, every gradient 0); (2, 0, 3, 3): no channels.
SHAPES = [(2, 3, 5, 7), (2, 4, 33, 41), (1, 1, 90, 90), (2, 8, 70, 70), (3, 4, 1, 1), (1, 5, 1, 9), (2, 3, 0, 4),
          (2, 0, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("tlu,learned_eps", [(True, False), (False, True), (True, True)])
def test_float64_forward_and_all_grads_match_reference(shape, channels_last, tlu, learned_eps):
    args = make_inputs(shape, tlu=tlu, learned_eps=learned_eps, channels_last=channels_last)
    assert_matches_reference(*args, atol=1e-10, rtol=1e-10)


def test_gradcheck_float64():
    x, weight, bias, tau, eps_l = make_inputs((2, 3, 3, 4), tlu=True, learned_eps=True)
    f = lambda *a: frn(a[0], a[1], a[2], a[3], 1e-6, a[4], impl="op")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, weight, bias, tau, eps_l), eps=1e-6, atol=1e-6)
    # Planes of 2 elements: eps_l has a sizeable effect, so its gradient is really checked.
    x2, w2, b2, t2, e2 = make_inputs((2, 3, 1, 2), tlu=False, learned_eps=True, seed=3)
    f2 = lambda *a: frn(a[0], a[1], a[2], None, 1e-6, a[3], impl="op")  # noqa: E731
    assert torch.autograd.gradcheck(f2, (x2, w2, b2, e2), eps=1e-6, atol=1e-6)
    xc, wc, bc, tc, _ = make_inputs((2, 3, 3, 4), channels_last=True, seed=4)
    fc = lambda *a: frn(a[0], a[1], a[2], a[3], 1e-6, None, impl="op")  # noqa: E731
    assert torch.autograd.gradcheck(fc, (xc, wc, bc, tc), eps=1e-6, atol=1e-6)


def test_opcheck_cpu():
    opcheck_all("cpu")


def test_backward_without_grad_input_gives_same_parameter_grads():
    x, w, b, t, e = make_inputs((2, 3, 6, 5), learned_eps=True, requires_grad=False)
    _, rstd = torch.ops.frn_det.frn(x, w, b, t, 1e-6, e)
    g = torch.randn_like(x)
    full = torch.ops.frn_det.frn_backward(g, x, w, b, t, rstd, e, True)
    params_only = torch.ops.frn_det.frn_backward(g, x, w, b, t, rstd, e, False)
    assert full[0].shape == x.shape and params_only[0].numel() == 0
    for a, b_ in zip(full[1:], params_only[1:]):
        torch.testing.assert_close(a, b_, atol=0, rtol=0)


# ---- reduced precision and edge cases ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_inputs_up_to_6e4_are_finite_and_correct(dtype, channels_last):
    # x^2 computed in fp16 would overflow (65504 is fp16's max) for |x| >= 256.
    x, w, b, t, _ = make_inputs((2, 4, 9, 11), dtype=dtype, channels_last=channels_last, scale=2e4)
    with torch.no_grad():
        x.clamp_(-6e4, 6e4)
        x[0, 0, 0, 0] = 6e4
        x[1, 2, 3, 4] = -6e4
    out, grads = assert_matches_reference(x, w, b, t, None, atol=2e-2, rtol=1e-2)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations_with_fp32_parameters_as_under_autocast(dtype):
    x, w, b, t, e = make_inputs((2, 4, 6, 7), dtype=dtype, param_dtype=torch.float32, learned_eps=True)
    out, grads = assert_matches_reference(x, w, b, t, e, atol=2e-2, rtol=1e-2)
    assert out.dtype == dtype and grads[0].dtype == dtype
    assert all(g.dtype == torch.float32 for g in grads[1:])


def _op_and_reference_grads(x, w, b, t, e, seed=1):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
    _, grads = run_with_grads(lambda *a: frn(*a, impl="op"), x, w, b, t, e, grad_out)
    ref_args = [a.detach().double().requires_grad_() if a is not None else None for a in (x, w, b, t, e)]
    _, ref_grads = run_with_grads(frn_reference, *ref_args, grad_out.double())
    return grads, ref_grads, grad_out.double(), ref_args


def test_the_comparison_fails_a_zero_grad_x_of_large_half_inputs():
    """The rule of the 6e4 test: grad_x is ~3e-4 there, so an absolute 2e-2 passed a zero grad_x."""
    x, w, b, t, _ = make_inputs((2, 4, 9, 11), dtype=torch.float16, scale=2e4)
    grads, ref_grads, _, _ = _op_and_reference_grads(x, w, b, t, None)
    assert float(ref_grads[0].abs().max()) < 1e-2
    assert_grads_close((x, w, b, t, None), grads, ref_grads, atol=2e-2, rtol=1e-2)
    with pytest.raises(AssertionError, match="grad of x"):
        assert_grads_close((x, w, b, t, None), [torch.zeros_like(grads[0])] + grads[1:], ref_grads, 2e-2, 1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_comparison_fails_parameter_gradients_summed_in_half_precision(dtype):
    """fp32 parameter gradients of half activations are held to fp32's accuracy: grad_weight summed
    term by term in the activations' dtype (what a kernel without fp32 accumulation computes) fails."""
    x, w, b, t, e = make_inputs((2, 4, 6, 7), dtype=dtype, param_dtype=torch.float32, learned_eps=True)
    grads, ref_grads, grad_out, ref_args = _op_and_reference_grads(x, w, b, t, e)
    assert_grads_close((x, w, b, t, e), grads, ref_grads, atol=2e-2, rtol=1e-2)
    x64 = ref_args[0].detach()
    rstd = torch.rsqrt(x64.square().mean(dim=(2, 3), keepdim=True) + 1e-6 + 0.05)
    y = w.detach().double().view(1, -1, 1, 1) * x64 * rstd + b.detach().double().view(1, -1, 1, 1)
    terms = (grad_out * (y >= t.detach().double().view(1, -1, 1, 1)) * x64 * rstd).transpose(0, 1).reshape(4, -1)
    in_half = torch.zeros(4, dtype=dtype)
    for k in range(terms.shape[1]):
        in_half = in_half + terms[:, k].to(dtype)
    if dtype == torch.float16:  # the old rule, one tolerance for every tensor, passed it
        torch.testing.assert_close(in_half.double(), ref_grads[1], atol=2e-2, rtol=1e-2)
    with pytest.raises(AssertionError, match="grad of weight"):
        assert_grads_close((x, w, b, t, e), [grads[0], in_half.float()] + grads[2:], ref_grads, 2e-2, 1e-2)


def test_autocast_cpu_conv_then_frn():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    layer = frn_module.FilterResponseNorm2d(8, impl="op")
    x = torch.randn(2, 3, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        out = layer(y)
    assert y.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
    ref = frn_reference(y.detach().double(), layer.weight.double(), layer.bias.double(), layer.tau.double())
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_empty_batch(channels_last):
    x, w, b, t, e = make_inputs((0, 4, 5, 6), channels_last=channels_last, learned_eps=True)
    out = frn(x, w, b, t, 1e-6, e, impl="op")
    assert out.shape == (0, 4, 5, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape
    for p in (w, b, t, e):
        assert p.grad is not None and (p.grad == 0).all()


@pytest.mark.parametrize("learned_eps", [False, True])
def test_one_by_one_planes_give_no_nan(learned_eps):
    x, w, b, t, e = make_inputs((4, 6, 1, 1), learned_eps=learned_eps, dtype=torch.float32)
    with torch.no_grad():
        x[0] = 0.0  # 0 / sqrt(0 + eps)
        x[1] = 1e-20
    out, grads = assert_matches_reference(x, w, b, t, e, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out).all()
    for g in grads:
        if g is not None:
            assert torch.isfinite(g).all()


def test_channels_last_output_keeps_format_and_matches_contiguous():
    x, w, b, t, e = make_inputs((2, 5, 6, 7), dtype=torch.float32, learned_eps=True, requires_grad=False)
    xc = x.contiguous(memory_format=torch.channels_last)
    out_c = frn(xc, w, b, t, 1e-6, e, impl="op")
    out = frn(x, w, b, t, 1e-6, e, impl="op")
    assert out_c.is_contiguous(memory_format=torch.channels_last) and not out_c.is_contiguous()
    assert out.is_contiguous()
    torch.testing.assert_close(out_c, out, atol=1e-6, rtol=1e-5)


def test_non_contiguous_views():
    base, w, b, t, e = make_inputs((3, 8, 9, 10), learned_eps=True, requires_grad=False)
    views = [base[:, ::2], base[::2, :4, 1:, ::3], base.transpose(2, 3), base[:, :4].permute(0, 1, 3, 2)]
    for view in views:
        assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
        x = view.detach().requires_grad_()
        C = x.shape[1]
        params = [p[:C].clone().requires_grad_() for p in (w, b, t)]
        assert_matches_reference(x, *params, e.clone().requires_grad_(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 6, 5), (1, 1, 90, 90)])
def test_nan_stays_in_its_plane(channels_last, shape):
    x, w, b, t, _ = make_inputs(shape, dtype=torch.float32, channels_last=channels_last, requires_grad=False)
    g = torch.randn(shape)
    bad = x.clone()
    bad[0, 0, 1, 2] = float("nan")
    outs = []
    for inp in (x, bad):
        inp = inp.clone().requires_grad_()
        out = frn(inp, w, b, t, 1e-6, None, impl="op")
        out.backward(g)
        outs.append((out.detach(), inp.grad))
    (out_ok, gx_ok), (out_bad, gx_bad) = outs
    other = torch.ones(shape, dtype=torch.bool)
    other[0, 0] = False
    if other.any():
        assert torch.isfinite(out_bad[other]).all() and torch.isfinite(gx_bad[other]).all()
        torch.testing.assert_close(out_bad[other], out_ok[other], atol=0, rtol=0)
        torch.testing.assert_close(gx_bad[other], gx_ok[other], atol=0, rtol=0)
    assert torch.isnan(gx_bad[0, 0]).any()  # the poisoned plane itself is not silently "fixed"
    assert torch.isnan(out_bad[0, 0]).all()  # the TLU passes NaN on (max(NaN, tau) is NaN, as torch.maximum)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_independence(channels_last):
    x, w, b, t, e = make_inputs((3, 4, 7, 6), dtype=torch.float32, channels_last=channels_last,
                                learned_eps=True, requires_grad=False)
    g = torch.randn(x.shape)
    results = []
    for seed in (0, 1):
        xi = x.clone()
        gi = g.clone()
        gen = torch.Generator().manual_seed(100 + seed)
        xi[1:] = torch.randn(xi[1:].shape, generator=gen) * (10 ** seed)
        gi[1:] = torch.randn(gi[1:].shape, generator=gen)
        xi.requires_grad_()
        out = frn(xi, w, b, t, 1e-6, e, impl="op")
        out.backward(gi)
        results.append((out[0].detach(), xi.grad[0]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=0, rtol=0)
    # Batch size does not matter either: sample 0 alone gives the same numbers.
    x0 = x[:1].clone().requires_grad_()
    out0 = frn(x0, w, b, t, 1e-6, e, impl="op")
    out0.backward(g[:1])
    torch.testing.assert_close(out0[0].detach(), results[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x0.grad[0], results[0][1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 90, 90), (1, 2, 100, 90)])
@pytest.mark.parametrize("tlu,learned_eps", [(True, False), (False, True)])
def test_split_plane_path_matches_reference(shape, tlu, learned_eps):
    """The NCHW split path (fewer planes than threads: 4 threads pinned, whatever make test gives a
    worker), forward and every gradient, against the float64 reference."""
    args = make_inputs(shape, tlu=tlu, learned_eps=learned_eps)
    with num_threads(4):
        assert torch.ops.frn_det._cpu_plan(args[0]) == "split"
        assert_matches_reference(*args, atol=1e-10, rtol=1e-10)


def test_results_do_not_depend_on_thread_count():
    # The fused path at 1 thread and the split path at 4: sums run over fixed chunks either way.
    x, w, b, t, _ = make_inputs((1, 2, 100, 90), dtype=torch.float32, requires_grad=False)
    g = torch.randn(x.shape)
    results = []
    for n, path in ((1, "planes"), (4, "split")):
        with num_threads(n):
            assert torch.ops.frn_det._cpu_plan(x) == path
            out, rstd = torch.ops.frn_det.frn(x, w, b, t, 1e-6, None)
            grads = torch.ops.frn_det.frn_backward(g, x, w, b, t, rstd, None, True)
            results.append((out, rstd) + tuple(grads[:4]))
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, atol=0, rtol=0)


# One shape per CPU path at 4 threads, and whether it is channels_last.
CPU_PATHS = {"planes": ((2, 16, 30, 30), False), "split": ((1, 2, 100, 90), False),
             "samples": ((2, 8, 10, 10), True), "rows": ((2, 8, 70, 70), True)}
HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU: every test runs the baseline build")
@pytest.mark.parametrize("path", list(CPU_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_avx2_and_baseline_builds_give_the_same_bits(path, dtype):
    # The CPU kernels run their AVX2 build where the CPU has it; the lanes, not the vector width, fix
    # every sum's order, so the baseline build (FRN_DET_CPU_AVX2=0, or a CPU without AVX2) agrees bit for bit.
    shape, channels_last = CPU_PATHS[path]
    x, w, b, t, e = make_inputs(shape, dtype=dtype, learned_eps=True, channels_last=channels_last,
                                param_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                                requires_grad=False)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    if channels_last:
        g = g.contiguous(memory_format=torch.channels_last)
    ops_ = torch.ops.frn_det
    results = {}
    previous = ops_._set_cpu_avx2(True)
    try:
        for enabled, isa in ((True, "avx2"), (False, "baseline")):
            ops_._set_cpu_avx2(enabled)
            with num_threads(4):
                assert ops_._cpu_isa() == isa and ops_._cpu_plan(x) == path
                out, rstd = ops_.frn(x, w, b, t, 1e-6, e)
                outc, mean, rstdc = ops_.frn_centered(x, w, b, t, 1e-6, e)
                results[isa] = ((out, rstd) + tuple(ops_.frn_backward(g, x, w, b, t, rstd, e, True))
                                + (outc, mean, rstdc)
                                + tuple(ops_.frn_centered_backward(g, x, w, b, t, mean, rstdc, e, True)))
    finally:
        ops_._set_cpu_avx2(previous)
    for a, b_ in zip(results["avx2"], results["baseline"]):
        assert torch.equal(a.contiguous().view(-1).view(torch.uint8), b_.contiguous().view(-1).view(torch.uint8))


def test_cpu_plan_names_the_path_of_each_layout():
    with num_threads(4):
        assert torch.ops.frn_det._cpu_plan(torch.zeros(8, 4, 90, 90)) == "planes"  # planes >= threads
        assert torch.ops.frn_det._cpu_plan(torch.zeros(1, 2, 8, 8)) == "planes"  # one chunk a plane
        cl = torch.zeros(2, 8, 70, 70).contiguous(memory_format=torch.channels_last)
        assert torch.ops.frn_det._cpu_plan(cl) == "rows"
        assert torch.ops.frn_det._cpu_plan(cl[:, :2, :10, :10].contiguous(memory_format=torch.channels_last)) == "samples"
    with pytest.raises(ValueError, match="_cpu_plan: x must be 4D"):
        torch.ops.frn_det._cpu_plan(torch.zeros(2, 3))


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="Linux builds with OpenMP only (torch elsewhere: its own thread pool)")
def test_cpu_kernels_run_their_parallel_loops_on_torchs_threads():
    """ATen's parallel_for compiles to a serial loop unless the extension is built with -fopenmp
    (setup.py); built so, the library calls into the OpenMP runtime that torch loaded."""
    import frn_det._C as ext

    with open(ext.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read()
    maps = [line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line]
    assert len(set(maps)) == 1, f"two OpenMP runtimes in the process: {sorted(set(maps))}"


@pytest.mark.parametrize("channels_last", [False, True])
def test_tie_rule_gradient_goes_to_y(channels_last):
    # y = x * a + bias == tau exactly where x == 0 (bias == tau): those gradients go to y (bias).
    # Planes of 51 elements cover the kernels' vectorised loops and their scalar tails.
    row = torch.tensor([0.0, 1.0, -1.0, 0.0, 2.0, -0.5], dtype=torch.float32)
    x = row.repeat(9)[:51].reshape(1, 1, 3, 17).repeat(2, 2, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.ones(2, requires_grad=True)
    b = torch.full((2,), 0.25, requires_grad=True)
    t = torch.full((2,), 0.25, requires_grad=True)
    g = torch.arange(1.0, 1.0 + x.numel()).reshape(x.shape)
    out = frn(x, w, b, t, 1e-6, None, impl="op")
    out.backward(g)
    xd = x.detach()
    above_or_tie = xd >= 0
    assert (out.detach()[xd == 0] == 0.25).all()
    torch.testing.assert_close(t.grad, (g * ~above_or_tie).sum(dim=(0, 2, 3)))
    torch.testing.assert_close(b.grad, (g * above_or_tie).sum(dim=(0, 2, 3)))


# ---- torch.compile ---------------------------------------------------------------------------

def test_torch_compile_fullgraph_matches_eager():
    assert_compiled_matches_eager(frn_module.FilterResponseNorm2d(4, learned_eps=True, impl="op"))


# ---- input validation: one exception type per mistake on every path (Python, C++, fake kernel) ----

def _valid():
    return make_inputs((2, 3, 4, 4), dtype=torch.float32, requires_grad=False)


def _raw_op(x, w, b, t=None, eps=1e-6, e=None):
    return torch.ops.frn_det.frn(x, w, b, t, eps, e)


# every path that validates: functional op wrapper, reference, the C++ op, the fake (meta) kernel
PATHS = {
    "frn(impl=op)": lambda x, w, b, t=None, eps=1e-6, e=None: frn(x, w, b, t, eps, e, impl="op"),
    "frn_reference": frn_reference,
    "C++ op": _raw_op,
    # inputs that require grad: the checks run below the op's (C++) autograd kernel too
    "C++ op, autograd": lambda x, w, b, t=None, eps=1e-6, e=None: _raw_op(
        *[a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
          for a in (x, w, b, t, eps, e)]),
    "fake kernel": lambda x, w, b, t=None, eps=1e-6, e=None: _raw_op(
        *[a.to("meta") if isinstance(a, torch.Tensor) else a for a in (x, w, b, t, eps, e)]),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_bad_arguments_raise_the_same_type_and_message_on_every_path(path):
    fn = PATHS[path]
    x, w, b, t, _ = _valid()
    cases = [
        (ValueError, "x must be 4D", lambda: fn(x[0], w, b, t)),
        (TypeError, "x must be float16, bfloat16, float32 or float64", lambda: fn(x.to(torch.int32), w, b, t)),
        (ValueError, "weight must have shape \\(3,\\) to match the input's 3 channels", lambda: fn(x, w[:2], b, t)),
        (ValueError, "tau must have shape", lambda: fn(x, w, b, t[:2])),
        (TypeError, "bias must be float16", lambda: fn(x, w, b.to(torch.int64), t)),
        (ValueError, "eps_l must be a scalar tensor", lambda: fn(x, w, b, t, 1e-6, torch.ones(2))),
        (ValueError, "eps must be >= 0", lambda: fn(x, w, b, t, -1.0)),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()


def test_parameters_on_another_device_are_rejected():
    x, w, b, t, _ = _valid()
    w_meta = w.to("meta")
    with pytest.raises(ValueError, match="weight is on meta"):
        frn(x, w_meta, b, t, impl="op")
    # The raw op dispatches to its fake (meta) kernel, which runs the same validator.
    with pytest.raises(ValueError, match="weight is on meta"):
        torch.ops.frn_det.frn(x, w_meta, b, t, 1e-6, None)
    with pytest.raises(ValueError, match="eps_l is on meta"):
        torch.ops.frn_det.frn(x, w, b, t, 1e-6, torch.tensor(1e-4, device="meta"))


def test_backends_without_kernels_get_the_ops_errors():
    # A CUDA tensor in a CPU-only build, or another device, reaches frn.cpp's
    # CompositeExplicitAutograd kernel; this machine has no such device, so the test calls it directly.
    x, w, b, t, _ = _valid()
    key = torch._C.DispatchKey.CompositeExplicitAutograd
    with pytest.raises(ValueError, match=r"no kernels for cpu tensors \(CPU and CUDA only\)"):
        torch.ops.frn_det.frn.default._op_dk(key, x, w, b, t, 1e-6, None)
    with pytest.raises(ValueError, match="eps must be >= 0"):  # the checks come first
        torch.ops.frn_det.frn.default._op_dk(key, x, w, b, t, -1.0, None)
    _, rstd = _raw_op(x, w, b, t)
    with pytest.raises(ValueError, match="no kernels for cpu tensors"):
        torch.ops.frn_det.frn_backward.default._op_dk(key, torch.ones_like(x), x, w, b, t, rstd, None, True)


def test_module_names_the_channel_mismatch():
    x, _, _, _, _ = _valid()
    with pytest.raises(ValueError, match=r"FilterResponseNorm2d\(5\) got an input with 3 channels"):
        frn_module.FilterResponseNorm2d(5, impl="op")(x)


@pytest.mark.parametrize("fake", [False, True], ids=["C++", "fake kernel"])
def test_backward_argument_checks(fake):
    x, w, b, t, _ = _valid()
    _, rstd = torch.ops.frn_det.frn(x, w, b, t, 1e-6, None)
    g = torch.randn_like(x)

    def bwd(*args):
        if fake:
            args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        return torch.ops.frn_det.frn_backward(*args)

    with pytest.raises(ValueError, match="grad_out has shape"):
        bwd(g[:1], x, w, b, t, rstd, None, True)
    with pytest.raises(TypeError, match="grad_out is torch.float64 but x is torch.float32|grad_out is Double but x is Float"):
        bwd(g.double(), x, w, b, t, rstd, None, True)
    with pytest.raises(ValueError, match="rstd must have shape"):
        bwd(g, x, w, b, t, rstd[:1], None, True)
    with pytest.raises(TypeError, match="rstd must be"):
        bwd(g, x, w, b, t, rstd.double(), None, True)


def _python_calls(fn):
    """The Python functions that ``fn()`` calls from frn_det or torch.library (file:function)."""
    calls = []

    def record(frame, event, _arg):
        name = frame.f_code.co_filename
        if event == "call" and ("frn_det" in name or "torch/_library" in name):
            calls.append(f"{os.path.basename(name)}:{frame.f_code.co_name}")

    sys.setprofile(record)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_op_and_its_backward_run_no_python():
    # Autograd is registered in C++ and the op's callers skip the Python checks (the C++ prologue
    # runs them): host time per call was the op's cost on small maps (docs/gpu.md).
    x, w, b, t, e = make_inputs((2, 3, 4, 4), learned_eps=True)
    layer = frn_module.FilterResponseNorm2d(3, learned_eps=True, impl="op").double()
    assert _python_calls(lambda: torch.ops.frn_det.frn.default(x, w, b, t, 1e-6, e)[0].sum().backward()) == []
    wrappers = _python_calls(lambda: (frn(x, w, b, t, 1e-6, e, impl="op").sum().backward(),
                                      layer(x).sum().backward()))
    assert [c for c in wrappers if c.startswith("validation.py") or "_library" in c] == []
    assert all(g is not None for g in (x.grad, w.grad, b.grad, t.grad, e.grad, layer.eps_l.grad))


def test_double_backward_raises_not_implemented():
    x, w, b, t, _ = make_inputs((2, 3, 4, 4))
    out, _ = torch.ops.frn_det.frn(x, w, b, t, 1e-6, None)
    grad_x, = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="frn: double backward"):
        grad_x.sum().backward()


def test_checks_run_on_fake_tensors_under_torch_compile():
    x, w, b, t, _ = _valid()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: frn(x, w, b, t, impl="op"), fullgraph=True)
    torch.testing.assert_close(compiled(x, w), frn(x, w, b, t, impl="op"))
    with pytest.raises(Exception, match=r"weight must have shape \(3,\)"):
        compiled(x, w[:2])


# ---- implementation switch ---------------------------------------------------------------------

def test_impl_switch_selects_the_implementation(monkeypatch):
    calls = []
    for name, fn in list(frn_module._IMPL_FUNCTIONS.items()):
        monkeypatch.setitem(frn_module._IMPL_FUNCTIONS, name, lambda *a, name=name, fn=fn: calls.append(name) or fn(*a))
    x, w, b, t, _ = _valid()
    frn_module.frn(x, w, b, t, impl="reference")
    frn_module.frn(x, w, b, t, impl="op")
    monkeypatch.setenv("FRN_DET_IMPL", "reference")
    frn_module.frn(x, w, b, t)
    monkeypatch.setenv("FRN_DET_IMPL", "op")
    frn_module.frn(x, w, b, t)
    monkeypatch.setenv("FRN_DET_IMPL", "auto")
    frn_module.frn(x, w, b, t)  # auto uses the op when the extension is built
    assert calls == ["reference", "op", "reference", "op", "op"]
    monkeypatch.setenv("FRN_DET_IMPL", "fast")
    with pytest.raises(ValueError, match="unknown FRN implementation"):
        frn_module.frn(x, w, b, t)


def test_layer_resolves_its_implementation_once_when_built(monkeypatch):
    monkeypatch.setenv("FRN_DET_IMPL", "reference")
    layer = frn_module.FilterResponseNorm2d(3)
    assert layer.impl == "reference" and "impl=reference" in repr(layer)
    monkeypatch.setenv("FRN_DET_IMPL", "op")  # read when a layer is built, not on every forward
    calls = []
    real_math = frn_module._frn_math
    monkeypatch.setattr(frn_module, "_frn_math", lambda *a: calls.append(1) or real_math(*a))
    layer(_valid()[0])
    assert calls == [1]
    assert frn_module.FilterResponseNorm2d(3).impl == "op"
    assert frn_module.FilterResponseNorm2d(3, impl="auto").impl == "op"  # the extension is built


# ---- kernel options ----------------------------------------------------------------------------


def _resident_setting():
    current = torch.ops.frn_det._set_cuda_resident(False)
    torch.ops.frn_det._set_cuda_resident(current)
    return current


def test_resident_planes_setting_is_scoped_and_restored():
    default = os.environ.get("FRN_DET_CUDA_RESIDENT") == "1"  # off unless the environment says 1
    torch.ops.frn_det._set_cuda_resident(False)
    with ops.cuda_resident_planes():
        assert _resident_setting() is True
        with ops.cuda_resident_planes(False):
            assert _resident_setting() is False
        assert _resident_setting() is True
    with pytest.raises(RuntimeError, match="inside"):
        with ops.cuda_resident_planes(True):
            raise RuntimeError("inside")
    assert _resident_setting() is False
    torch.ops.frn_det._set_cuda_resident(default)


@pytest.mark.parametrize("env,expected", [("1", True), ("0", False), (None, False)])
def test_resident_planes_from_the_environment(env, expected):
    import subprocess

    environ = {k: v for k, v in os.environ.items() if k != "FRN_DET_CUDA_RESIDENT"}
    if env is not None:
        environ["FRN_DET_CUDA_RESIDENT"] = env
    code = "import torch; from frn_det.layers import ops; print(torch.ops.frn_det._set_cuda_resident(False))"
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)


def test_resident_planes_leave_the_cpu_kernels_alone():
    args = make_inputs((2, 4, 40, 48), dtype=torch.float32, learned_eps=True, requires_grad=False)
    g = torch.randn(2, 4, 40, 48)
    default = _op_out_and_grads(*args, g)
    with ops.cuda_resident_planes():
        resident = _op_out_and_grads(*args, g)
    for a, b in zip(default, resident):
        assert torch.equal(a, b)


def test_cuda_plan_of_a_cpu_tensor_is_a_clear_error():
    with pytest.raises(ValueError, match="_cuda_plan: x must be a CUDA tensor.*got a cpu tensor"):
        torch.ops.frn_det._cuda_plan(torch.zeros(1, 2, 3, 4), False)


# ---- CUDA --------------------------------------------------------------------------------------

CUDA_TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 1e-2),
            torch.bfloat16: (6e-2, 3e-2)}
cuda = pytest.mark.cuda
KERNEL_PATHS = {**CUDA_PATHS, **RESIDENT_PATHS}


@pytest.fixture(autouse=True)
def _path_setting(request):
    """A test parametrized by a `path` runs under that path's kernel setting (resident planes on for
    RESIDENT_PATHS)."""
    callspec = getattr(request.node, "callspec", None)
    path = callspec.params.get("path") if callspec else None
    if path in RESIDENT_PATHS:
        with kernel_setting(path):
            yield
    else:
        yield


def _cuda_args(shape, dtype=torch.float32, channels_last=False, **kw):
    param_dtype = torch.float32 if dtype != torch.float64 else None
    return make_inputs(shape, dtype=dtype, channels_last=channels_last, device="cuda", param_dtype=param_dtype, **kw)


def _op_out_and_grads(x, w, b, t, e, g):
    """Output and (grad_x, grad_weight, grad_bias, grad_tau, grad_eps_l) of the raw ops."""
    out, rstd = torch.ops.frn_det.frn(x, w, b, t, 1e-6, e)
    return (out,) + tuple(torch.ops.frn_det.frn_backward(g, x, w, b, t, rstd, e, True))


@cuda
@pytest.mark.parametrize("dtype", list(CUDA_TOL), ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_cuda_paths_match_float64_reference(path, channels_last, dtype):
    shape = KERNEL_PATHS[path]
    atol, rtol = CUDA_TOL[dtype]
    for tlu, learned_eps in ((True, False), (False, True), (True, True)):
        args = _cuda_args(shape, dtype, channels_last, tlu=tlu, learned_eps=learned_eps)
        out, _ = assert_matches_reference(*args, atol=atol, rtol=rtol)
        if channels_last and shape[0] > 0 and shape[1] > 1 and shape[2] * shape[3] > 1:
            assert out.is_contiguous(memory_format=torch.channels_last)


@cuda
@pytest.mark.parametrize("max_grid", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cuda_grid_stride_loops(channels_last, max_grid):
    # A grid of at most 1 or 2 blocks per dimension: every plane kernel loops over many planes per
    # block (and per warp), the split path's stats and finalize kernels over planes / samples, the
    # parameter-gradient kernel over channels. No sum depends on the grid: results are bitwise those
    # of the uncapped launch.
    # With resident planes, each cluster loops over several planes.
    for path in ("warp_vec", "warp_scalar", "warp_partial", "block_vec", "block_scalar", "split_nchw",
                 "span_7x7", "span_tail", "resident_vec", "resident_scalar", "resident_cluster"):
        args = _cuda_args(KERNEL_PATHS[path], torch.float32, channels_last, learned_eps=True, requires_grad=False)
        g = torch.randn_like(args[0])
        with kernel_setting(path):
            uncapped = _op_out_and_grads(*args, g)
            with cuda_test_limits(max_grid=max_grid):
                capped = _op_out_and_grads(*args, g)
                assert_matches_reference(*[a.clone().requires_grad_() for a in args], atol=2e-4, rtol=2e-4)
        for a, b in zip(uncapped, capped):
            assert torch.equal(a, b)


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cuda_int64_apply_kernels(channels_last):
    with cuda_test_limits(force_int64=True):
        for dtype in (torch.float32, torch.float16):
            args = _cuda_args(CUDA_PATHS["split_nchw"], dtype, channels_last)
            assert_matches_reference(*args, atol=CUDA_TOL[dtype][0], rtol=CUDA_TOL[dtype][1])


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_cuda_backward_without_grad_input(path, channels_last):
    x, w, b, t, e = _cuda_args(KERNEL_PATHS[path], torch.float32, channels_last, learned_eps=True, requires_grad=False)
    _, rstd = torch.ops.frn_det.frn(x, w, b, t, 1e-6, e)
    g = torch.randn_like(x)
    full = torch.ops.frn_det.frn_backward(g, x, w, b, t, rstd, e, True)
    params_only = torch.ops.frn_det.frn_backward(g, x, w, b, t, rstd, e, False)
    assert params_only[0].numel() == 0
    for a, b_ in zip(full[1:], params_only[1:]):
        torch.testing.assert_close(a, b_, atol=0, rtol=0)


@cuda
def test_cuda_misaligned_and_strided_views():
    # Views whose data pointer is not 16-byte aligned, or that are not dense, take the scalar loads
    # (after the copy to a dense layout, for strided ones).
    for path in ("warp_vec", "block_vec", "span_7x7", "resident_vec", "resident_cluster"):
        with kernel_setting(path):
            _misaligned_and_strided(KERNEL_PATHS[path])


def _misaligned_and_strided(shape):
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    for dtype in (torch.float32, torch.float16):
        base = torch.randn(numel + 1, device="cuda", dtype=dtype)
        x = base[1:].view(shape)
        assert x.data_ptr() % 16 != 0
        _, w, b, t, e = _cuda_args(shape, dtype, learned_eps=True)
        assert_matches_reference(x.detach().requires_grad_(), w, b, t, e, *CUDA_TOL[dtype])
    wide = torch.randn(shape[0], shape[1] * 2, shape[2], shape[3], device="cuda")[:, ::2]
    _, w, b, t, _ = _cuda_args(shape, torch.float32)
    assert_matches_reference(wide.detach().requires_grad_(), w, b, t, None, 2e-4, 2e-4)
    # an aligned x with a misaligned grad_out: the backward falls back to scalar loads
    x, w, b, t, e = _cuda_args(shape, torch.float32, learned_eps=True, requires_grad=False)
    _, rstd = torch.ops.frn_det.frn(x, w, b, t, 1e-6, e)
    g = torch.randn(numel + 1, device="cuda")[1:].view(shape)
    assert g.data_ptr() % 16 != 0
    got = torch.ops.frn_det.frn_backward(g, x, w, b, t, rstd, e, True)
    # The scalar loads sum in another order than the 16-byte ones: equal to rounding, not bitwise.
    ref_args = [a.to("cpu", torch.float64).requires_grad_() for a in (x, w, b, t, e)]
    _, expected = run_with_grads(frn_reference, *ref_args, g.to("cpu", torch.float64))
    assert_grads_close((x, w, b, t, e), got, expected, *CUDA_TOL[torch.float32])


def _nonempty_paths():
    return [p for p, s in KERNEL_PATHS.items() if s[0] * s[1] * s[2] * s[3] > 0]


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("path", _nonempty_paths())
def test_cuda_nan_stays_in_its_plane(path, channels_last):
    shape = KERNEL_PATHS[path]
    x, w, b, t, _ = _cuda_args(shape, torch.float32, channels_last, requires_grad=False)
    g = torch.randn(shape, device="cuda")
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    (out_ok, *grads_ok), (out_bad, *grads_bad) = (_op_out_and_grads(v, w, b, t, None, g) for v in (x, bad))
    other = torch.ones(shape, dtype=torch.bool, device="cuda")
    other[0, 0] = False
    assert torch.equal(out_bad[other], out_ok[other]) and torch.equal(grads_bad[0][other], grads_ok[0][other])
    assert torch.isnan(out_bad[0, 0]).all()  # the TLU passes NaN on, as torch.maximum does
    assert torch.isnan(grads_bad[0][0, 0]).any() and torch.isnan(grads_bad[1][0])  # and so do the gradients


# Shapes of the tie-rule and TLU-mask tests, by path; "span" and "resident" run with resident planes on.
TIE_SHAPES = {"warp": (2, 2, 3, 17), "block": (2, 140, 3, 400), "split": (1, 2, 40, 102), "span": (2, 2, 3, 17),
              "resident": RESIDENT_PATHS["resident_cluster"]}


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("path", list(TIE_SHAPES))
def test_cuda_tie_rule(path, channels_last):
    with ops.cuda_resident_planes(path in ("span", "resident")):
        _tie_rule(TIE_SHAPES[path], channels_last)


def _tie_rule(shape, channels_last):
    # y = x * a + bias == tau exactly where x == 0 (bias == tau): those gradients go to y (bias).
    row = torch.tensor([0.0, 1.0, -1.0, 0.0, 2.0, -0.5])
    L = shape[2] * shape[3]
    x = row.repeat(L // 6 + 1)[:L].reshape(1, 1, shape[2], shape[3]).repeat(shape[0], shape[1], 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    xd = x.cuda().requires_grad_()
    b = torch.full((C,), 0.25, device="cuda", requires_grad=True)
    t = torch.full((C,), 0.25, device="cuda", requires_grad=True)
    g = torch.arange(1.0, 1.0 + x.numel()).reshape(x.shape)
    out = frn(xd, torch.ones(C, device="cuda"), b, t, 1e-6, None, impl="op")
    out.backward(g.cuda())
    above_or_tie = x >= 0
    assert (out.detach().cpu()[x == 0] == 0.25).all()
    torch.testing.assert_close(t.grad.cpu(), (g * ~above_or_tie).sum(dim=(0, 2, 3)))
    torch.testing.assert_close(b.grad.cpu(), (g * above_or_tie).sum(dim=(0, 2, 3)))


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("path,shape", [("warp", (4, 64, 9, 9)), ("block", (2, 300, 33, 33)), ("split", (1, 4, 64, 64)),
                                        ("span", (4, 64, 9, 9)), ("resident", RESIDENT_PATHS["resident_cluster"])],
                         ids=["warp", "block", "split", "span", "resident"])
def test_cuda_tlu_mask_matches_the_cpu_kernels(path, shape, channels_last):
    # Given the same rstd, CPU and CUDA compute y = x * (gamma * rstd) + beta with the same roundings,
    # so they put every element on the same side of tau, also at exact ties: tau is set to the y of
    # one element per channel, computed as the CPU kernels do (rounded multiply, rounded add).
    with ops.cuda_resident_planes(path in ("span", "resident")):
        _tlu_mask_matches_the_cpu_kernels(shape, channels_last)


def _tlu_mask_matches_the_cpu_kernels(shape, channels_last):
    x, w, b, _, _ = make_inputs(shape, dtype=torch.float32, channels_last=channels_last, requires_grad=False)
    _, rstd = torch.ops.frn_det.frn(x, w, b, None, 1e-6, None)
    a = w * rstd[0]
    tau = x[0, :, 0, 0] * a + b  # two roundings, as the kernels
    ones = torch.ones_like(x)
    counts = {}
    for device in ("cpu", "cuda"):
        args = [v.to(device) for v in (ones, x, w, b, tau, rstd)]
        _, _, passed, below, _ = torch.ops.frn_det.frn_backward(*args, None, False)
        counts[device] = (passed.cpu(), below.cpu())  # per channel: elements passing / below tau
    assert (counts["cpu"][0] > 0).all() and (counts["cpu"][1] > 0).all()
    assert torch.equal(counts["cpu"][0], counts["cuda"][0]) and torch.equal(counts["cpu"][1], counts["cuda"][1])


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("path", _nonempty_paths())
def test_cuda_batch_independence(path, channels_last):
    shape = KERNEL_PATHS[path]
    if shape[0] < 2:
        shape = (2,) + shape[1:]
    x, w, b, t, e = _cuda_args(shape, torch.float32, channels_last, learned_eps=True, requires_grad=False)
    g = torch.randn(shape, device="cuda")
    x2, g2 = x.clone(), g.clone()
    x2[1:] = torch.randn_like(x2[1:]) * 10
    g2[1:] = torch.randn_like(g2[1:])
    r1, r2 = _op_out_and_grads(x, w, b, t, e, g), _op_out_and_grads(x2, w, b, t, e, g2)
    assert torch.equal(r1[0][0], r2[0][0]) and torch.equal(r1[1][0], r2[1][0])


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("path", _nonempty_paths())
def test_cuda_runs_are_bitwise_identical(path, channels_last):
    for dtype in (torch.float32, torch.float16):
        x, w, b, t, e = _cuda_args(KERNEL_PATHS[path], dtype, channels_last, learned_eps=True, requires_grad=False)
        g = torch.randn_like(x)
        first, second = _op_out_and_grads(x, w, b, t, e, g), _op_out_and_grads(x, w, b, t, e, g)
        for a, b_ in zip(first, second):
            assert torch.equal(a, b_)


@cuda
@pytest.mark.parametrize("path", ["split_nchw", "resident_cluster"])
def test_cuda_non_default_stream(path):
    x, w, b, t, e = _cuda_args(KERNEL_PATHS[path], torch.float32, learned_eps=True, requires_grad=False)
    g = torch.randn_like(x)
    expected = _op_out_and_grads(x, w, b, t, e, g)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _op_out_and_grads(x, w, b, t, e, g)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b_ in zip(expected, got):
        assert torch.equal(a, b_)


@cuda
@pytest.mark.multi_gpu
def test_cuda_second_device():
    for path in ("warp_vec", "block_vec", "split_nchw"):
        args = _cuda_args(CUDA_PATHS[path], torch.float32, learned_eps=True, requires_grad=False)
        g = torch.randn_like(args[0])
        on0 = _op_out_and_grads(*args, g)
        moved = [a.to("cuda:1") if a is not None else None for a in args]
        on1 = _op_out_and_grads(*moved, g.to("cuda:1"))
        assert all(r.device == torch.device("cuda:1") for r in on1)
        for a, b_ in zip(on0, on1):
            assert torch.equal(a, b_.to("cuda:0"))


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_half_inputs_up_to_6e4(dtype):
    for path in ("warp_vec", "block_vec", "split_nchw", "span_7x7", "resident_vec", "resident_cluster"):
        x, w, b, t, _ = _cuda_args(KERNEL_PATHS[path], dtype, scale=2e4)
        with torch.no_grad():
            x.clamp_(-6e4, 6e4)
        with kernel_setting(path):
            out, _ = assert_matches_reference(x, w, b, t, None, atol=2e-2, rtol=1e-2)
        assert torch.isfinite(out).all()


@cuda
def test_cuda_resident_plans():
    # Which kernels each resident shape takes, forward / backward: on sm_90 with 132 SMs (H100 SXM,
    # H200) exactly the table of kernel_paths; before sm_90 no clusters. With resident planes off (the
    # default) no shape takes them; channels_last input always splits.
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    props = torch.cuda.get_device_properties()
    table = (props.major, props.minor, props.multi_processor_count) == (9, 0, 132)
    for path, shape in RESIDENT_PATHS.items():
        for name, dtype in dtypes.items():
            x = torch.empty(shape, device="cuda", dtype=dtype)
            default = tuple(torch.ops.frn_det._cuda_plan(x, bwd) for bwd in (False, True))
            assert all(p in ("warp", "block", "split") for p in default), (path, name, default)
            with kernel_setting(path):
                plans = tuple(torch.ops.frn_det._cuda_plan(x, bwd) for bwd in (False, True))
                channels_last = torch.ops.frn_det._cuda_plan(x.contiguous(memory_format=torch.channels_last), False)
            assert channels_last == "split" or x.shape[2] * x.shape[3] == 1, (path, name)
            if table:
                assert plans == RESIDENT_PLANS_SM90[path][name], (path, name)
            elif path.startswith("span"):
                assert all(p.startswith("span:") for p in plans), (path, name, plans)
            if props.major < 9:
                assert all(p in ("resident:1", "split") or p.startswith("span:") for p in plans), (path, name, plans)


@cuda
def test_cuda_opcheck():
    opcheck_all("cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_outputs_and_gradients_are_bitwise_identical_run_to_run(device):
    # CPU: fixed chunks and a fixed combine order; CUDA: no atomics (see the CUDA path tests too).
    for shape, channels_last in (((2, 8, 70, 70), True), ((1, 2, 100, 90), False), ((64, 16, 7, 7), False)):
        x, w, b, t, e = make_inputs(shape, dtype=torch.float32, channels_last=channels_last, learned_eps=True,
                                    device=device, requires_grad=False)
        g = torch.randn(shape).to(device)
        first, second = _op_out_and_grads(x, w, b, t, e, g), _op_out_and_grads(x, w, b, t, e, g)
        for a, b_ in zip(first, second):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_empty_planes_with_eps_zero_give_zero_parameter_gradients(device):
    # H*W = 0 and eps = 0: rstd is inf, but nothing was normalised: every gradient is 0, not NaN.
    x, w, b, t, _ = make_inputs((2, 3, 0, 4), dtype=torch.float32, device=device, requires_grad=False)
    _, rstd = torch.ops.frn_det.frn(x, w, b, t, 0.0, None)
    grads = torch.ops.frn_det.frn_backward(torch.randn_like(x), x, w, b, t, rstd, None, True)
    for g in grads[1:4]:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_one_element_planes_give_the_correctly_rounded_rstd(device):
    # One element per plane: the sum of squares is exact, so rstd = 1 / sqrt(x^2 + (eps + |eps_l|)), each
    # step rounded to float32, is determined: the CPU and CUDA kernels and this torch expression agree
    # bitwise (eps + |eps_l| rounded in float32, no fast-math sqrt or division).
    x, w, b, _, e = make_inputs((8, 64, 1, 1), dtype=torch.float32, learned_eps=True, device=device,
                                requires_grad=False, scale=1e-2)
    _, rstd = torch.ops.frn_det.frn(x, w, b, None, 1e-5, e)
    # numpy's float32 sqrt and division are the IEEE operations (torch's vectorised sqrt is 0.5001 ulp)
    xs, es = x.cpu().numpy().reshape(8, 64), e.cpu().numpy()
    eps_eff = np.float32(1e-5) + np.abs(es)
    expected = np.float32(1) / np.sqrt(xs * xs + eps_eff)
    assert expected.dtype == np.float32 and np.array_equal(rstd.cpu().numpy(), expected)

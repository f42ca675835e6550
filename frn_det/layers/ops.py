"""Python side of the fused FRN custom op ``torch.ops.frn_det``: loading and fake kernels.

The C++ library (``frn_det/layers/csrc``) defines two ops:

* ``frn(x, weight, bias, tau, eps, eps_l) -> (out, rstd)``: ``out`` has x's shape, dtype and memory
  format; ``rstd`` = 1 / sqrt(mean_hw(x^2) + eps + |eps_l|) per (sample, channel), shape (N, C),
  fp32 (fp64 for fp64 x). ``tau`` and ``eps_l`` may be None.
* ``frn_backward(grad_out, x, weight, bias, tau, rstd, eps_l, grad_input)
  -> (grad_x, grad_weight, grad_bias, grad_tau, grad_eps_l)``; grad_x is an empty (0,) tensor
  unless ``grad_input``, grad_tau / grad_eps_l are empty (0,) tensors when tau / eps_l are None.
* ``frn_centered(x, weight, bias, tau, eps, eps_l) -> (out, mean, rstd)``: FRN's centred variant
  (InstanceNorm + affine + TLU): ``mean`` per (sample, channel), (N, C) float64 for every dtype,
  ``rstd`` = 1 / sqrt(mean_hw((x - mean)^2) + eps + |eps_l|) as frn's. CPU kernels only: on CUDA
  tensors it raises NotImplementedError. A 1x1 (or constant) plane's output is exactly ``bias``.
* ``frn_centered_backward(grad_out, x, weight, bias, tau, mean, rstd, eps_l, grad_input)``: its
  gradients, with frn_backward's conventions.

Parameters may have another floating dtype than x (fp32 parameters with fp16/bf16 activations, as
under autocast): the kernels read them in the accumulation dtype, the output takes x's dtype and
each parameter gradient its parameter's dtype. Autograd is registered in C++
(csrc/frn_autograd.cpp, no Python per call): backward saves x, the (tiny) parameters and rstd.
The op's C++ prologue checks its arguments with ``validation``'s messages, so callers of the op need
no Python checks; the fake kernels below run ``validation`` itself.
"""
import contextlib

import torch

from .validation import CENTERED_MEAN_DTYPE, accumulation_dtype, check_frn_args, check_frn_backward_args

try:
    from frn_det import _C  # noqa: F401  (loading registers the torch.ops.frn_det kernels)

    _LOAD_ERROR = None
except ImportError as e:  # the pure-PyTorch reference still works without the extension
    _LOAD_ERROR = e
    # The schemas alone (no kernel), so that TorchScript can compile FilterResponseNorm2d.forward,
    # whose op branches a reference layer never takes.
    torch.library.define("frn_det::frn", "(Tensor x, Tensor weight, Tensor bias, Tensor? tau, float eps, "
                         "Tensor? eps_l) -> (Tensor out, Tensor rstd)")
    torch.library.define("frn_det::frn_centered", "(Tensor x, Tensor weight, Tensor bias, Tensor? tau, float eps, "
                         "Tensor? eps_l) -> (Tensor out, Tensor mean, Tensor rstd)")


def is_available() -> bool:
    return _LOAD_ERROR is None


def load_error():
    return _LOAD_ERROR


@contextlib.contextmanager
def cuda_resident_planes(enabled=True):
    """Within the block, the CUDA kernels hold each NCHW plane on chip between its statistics and its
    output (one DRAM pass: a large plane in shared memory of one block, or of a thread-block cluster
    on sm_90+; small planes as spans of many planes per block), where it fits; outside it, the
    setting it had before. Other paths and the
    CPU kernels are unaffected. Opt-in (``FRN_DET_CUDA_RESIDENT=1`` sets it for a whole process)
    until these kernels have passed ``tools/gpu_check.sh`` on a GPU: written and compiled, not yet
    run on one. The setting is read when a kernel launches (for CUDA graphs: at capture)."""
    previous = torch.ops.frn_det._set_cuda_resident(bool(enabled))
    try:
        yield
    finally:
        torch.ops.frn_det._set_cuda_resident(previous)


@contextlib.contextmanager
def cpu_avx2(enabled=True):
    """Within the block, the CPU kernels run their AVX2 build where the CPU has it (``enabled``, the
    default everywhere) or their baseline build (SSE2 on x86-64); outside it, the setting it had
    before. Both give bitwise the same results; AVX2 is faster where the loops, not memory, bound a
    call (small planes). ``FRN_DET_CPU_AVX2=0`` starts a process with the baseline build;
    ``torch.ops.frn_det._cpu_isa()`` names the build that runs."""
    previous = torch.ops.frn_det._set_cpu_avx2(bool(enabled))
    try:
        yield
    finally:
        torch.ops.frn_det._set_cpu_avx2(previous)


def _kernel_memory_format(x):
    # Mirrors layout_of() in frn.cpp: outputs are contiguous unless x is channels_last-only.
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


if is_available():

    @torch.library.register_fake("frn_det::frn")
    def _frn_fake(x, weight, bias, tau, eps, eps_l):
        check_frn_args(x, weight, bias, tau, eps, eps_l)
        out = torch.empty_like(x, memory_format=_kernel_memory_format(x))
        rstd = x.new_empty((x.shape[0], x.shape[1]), dtype=accumulation_dtype(x.dtype))
        return out, rstd

    def _grads_fake(x, weight, bias, tau, eps_l, grad_input):
        acc = accumulation_dtype(x.dtype)
        grad_x = (torch.empty_like(x, memory_format=_kernel_memory_format(x)) if grad_input
                  else x.new_empty((0,)))
        grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        grad_bias = torch.empty_like(bias, memory_format=torch.contiguous_format)
        grad_tau = (torch.empty_like(tau, memory_format=torch.contiguous_format) if tau is not None
                    else x.new_empty((0,), dtype=acc))
        grad_eps_l = (torch.empty_like(eps_l, memory_format=torch.contiguous_format) if eps_l is not None
                      else x.new_empty((0,), dtype=acc))
        return grad_x, grad_weight, grad_bias, grad_tau, grad_eps_l

    @torch.library.register_fake("frn_det::frn_backward")
    def _frn_backward_fake(grad_out, x, weight, bias, tau, rstd, eps_l, grad_input):
        check_frn_backward_args(grad_out, x, weight, bias, tau, rstd, eps_l)
        return _grads_fake(x, weight, bias, tau, eps_l, grad_input)

    @torch.library.register_fake("frn_det::frn_centered")
    def _frn_centered_fake(x, weight, bias, tau, eps, eps_l):
        check_frn_args(x, weight, bias, tau, eps, eps_l)
        out = torch.empty_like(x, memory_format=_kernel_memory_format(x))
        mean = x.new_empty((x.shape[0], x.shape[1]), dtype=CENTERED_MEAN_DTYPE)
        rstd = x.new_empty((x.shape[0], x.shape[1]), dtype=accumulation_dtype(x.dtype))
        return out, mean, rstd

    @torch.library.register_fake("frn_det::frn_centered_backward")
    def _frn_centered_backward_fake(grad_out, x, weight, bias, tau, mean, rstd, eps_l, grad_input):
        check_frn_backward_args(grad_out, x, weight, bias, tau, rstd, eps_l, mean=mean)
        return _grads_fake(x, weight, bias, tau, eps_l, grad_input)

"""Filter Response Normalization (FRN) and the Thresholded Linear Unit (TLU).

Per sample ``n`` and channel ``c`` (arXiv 1911.09737)::

    nu2 = mean_{h,w} x^2            (no mean subtraction, no pooling over the batch)
    y   = weight * x / sqrt(nu2 + eps_eff) + bias,     eps_eff = eps + |eps_l|
    z   = max(y, tau)               (TLU; omitted when tau is None)

Gradient tie rule: where ``y == tau`` the TLU passes the gradient to ``y`` (the paper's
convention), never to ``tau``. A NaN ``y`` stays NaN through the TLU (as through torch.maximum and
ReLU), forward and backward, in both implementations.

Two implementations compute the same function:

* ``"op"``: the fused custom op ``torch.ops.frn_det.frn`` (C++ CPU and CUDA kernels, fp32
  accumulation for fp16/bf16 inputs), see ``frn_det/layers/ops.py``;
* ``"reference"``: plain PyTorch, used by the tests and benchmarks as ground truth.

The implementation is picked by the ``impl`` argument, else by the environment variable
``FRN_DET_IMPL`` (``auto`` | ``op`` | ``reference``); ``auto`` (the default) uses the op when the
compiled extension is present and falls back to the reference otherwise. The functional
:func:`frn` resolves it on every call, a :class:`FilterResponseNorm2d` once, when it is built.
"""
import os
from typing import Optional

import torch
from torch import nn

from . import ops
from .validation import check_frn_args

IMPLS = ("auto", "op", "reference")


def resolve_impl(impl: Optional[str] = None) -> str:
    """Return "op" or "reference" for ``impl`` (None reads ``FRN_DET_IMPL``)."""
    name = (impl or os.environ.get("FRN_DET_IMPL", "auto")).lower()
    if name not in IMPLS:
        raise ValueError(f"unknown FRN implementation {name!r}; expected one of {IMPLS}")
    if name == "auto":
        return "op" if ops.is_available() else "reference"
    if name == "op" and not ops.is_available():
        raise RuntimeError(f"FRN implementation 'op' requested but frn_det._C is not built: {ops.load_error()}")
    return name


def tlu(y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """max(y, tau) with the TLU's rules: at ties the gradient goes to y, and a NaN y stays NaN (as
    through torch.maximum), so a diverged layer is not hidden behind tau."""
    return torch.where(y < tau, tau, y)


def _check_eager(x, weight, bias, tau, eps, eps_l):
    # Dynamo cannot trace the checks' message closures (under torch.compile the op's fake kernel runs
    # the same checks, and the reference's own ops reject bad shapes); under torch.jit.trace shapes
    # are tensors and a traced graph keeps no Python check anyway.
    if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        check_frn_args(x, weight, bias, tau, eps, eps_l)


def frn_math(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tau: Optional[torch.Tensor], eps: float,
             eps_l: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference's arithmetic without the argument checks (TorchScript compiles this)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)  # upcast before squaring: fp16 x^2 overflows for |x| >= 256
    # sum / L rather than mean: an empty plane (H*W = 0) has nu2 = 0, as in the kernels, so its
    # (absent) output has finite, zero gradients
    nu2 = xa.square().sum(dim=(2, 3), keepdim=True) / max(x.shape[2] * x.shape[3], 1)
    if eps_l is not None:
        rstd = torch.rsqrt(nu2 + (eps + eps_l.to(acc).abs().reshape(())))
    else:
        rstd = torch.rsqrt(nu2 + eps)
    y = xa * rstd * weight.to(acc).view(1, -1, 1, 1) + bias.to(acc).view(1, -1, 1, 1)
    if tau is not None:
        y = tlu(y, tau.to(acc).view(1, -1, 1, 1))
    return y.to(x.dtype)


def frn_reference(x, weight, bias, tau=None, eps: float = 1e-6, eps_l=None):
    """FRN (+ TLU when ``tau`` is given) in plain PyTorch ops; same contract as :func:`frn`."""
    _check_eager(x, weight, bias, tau, eps, eps_l)
    return frn_math(x, weight, bias, tau, eps, eps_l)


def frn_fused(x, weight, bias, tau=None, eps: float = 1e-6, eps_l=None):
    """FRN (+ TLU) through the fused op ``torch.ops.frn_det.frn``; same contract as :func:`frn`.

    No Python checks: the op's C++ prologue raises the same errors (a Python check per call cost
    as much host time as the CUDA kernels take on small maps)."""
    return ops.frn_op(x, weight, bias, tau, eps, eps_l)


_IMPL_FUNCTIONS = {"op": frn_fused, "reference": frn_reference}


def frn(x, weight, bias, tau=None, eps: float = 1e-6, eps_l=None, impl: Optional[str] = None):
    """Filter Response Normalization, optionally fused with TLU.

    Args:
        x: input of shape (N, C, H, W), N >= 0, any floating dtype; contiguous or channels_last.
        weight, bias: per-channel gamma and beta, shape (C,).
        tau: per-channel TLU threshold, shape (C,); None for FRN without TLU.
        eps: fixed epsilon added to the mean square.
        eps_l: optional learned scalar; the effective epsilon is ``eps + |eps_l|``.
        impl: "op", "reference" or "auto"; None reads ``FRN_DET_IMPL`` (default "auto").

    Returns:
        Tensor with the input's shape, dtype and memory format. Statistics accumulate in fp32
        (fp64 for fp64 input).

    The parameters may have another floating dtype than ``x`` (fp32 parameters with fp16/bf16
    activations, as under autocast): the output takes x's dtype, each gradient its tensor's dtype.
    Bad arguments raise ValueError (shapes, devices, values) or TypeError (dtypes).
    """
    return _IMPL_FUNCTIONS[resolve_impl(impl)](x, weight, bias, tau, eps, eps_l)


class FilterResponseNorm2d(nn.Module):
    """FRN over (N, C, H, W) inputs with an optional fused TLU.

    Args:
        num_features: number of channels C.
        eps: fixed epsilon (default 1e-6).
        learned_eps: add a learned scalar ``eps_l`` (init 1e-4); effective eps = eps + |eps_l|.
            The paper's remedy for 1x1 planes, where FRN with a tiny eps degenerates to sign(x).
        tlu: fuse the TLU ``max(y, tau)``; when False the module is FRN alone and ``tau`` is None.
        impl: "op", "reference" or "auto"; None reads ``FRN_DET_IMPL``. Resolved here, once, to
            "op" or "reference" (shown in the repr).

    Parameters: ``weight`` (gamma, init 1), ``bias`` (beta, init 0), ``tau`` (init 0) and ``eps_l``.
    :meth:`add_tlu` and :meth:`add_learned_eps` add the last two in place after construction.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learned_eps: bool = False, tlu: bool = True,
                 impl: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.impl = resolve_impl(impl)
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.tau = nn.Parameter(torch.empty(num_features, **factory)) if tlu else None
        self.eps_l = nn.Parameter(torch.empty((), **factory)) if learned_eps else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.tau is not None:
            nn.init.zeros_(self.tau)
        if self.eps_l is not None:
            nn.init.constant_(self.eps_l, 1e-4)

    def add_tlu(self) -> "FilterResponseNorm2d":
        """Fuse a TLU (tau = 0) into this layer in place, with the device, dtype and requires_grad
        (frozen or not) of its weight."""
        if self.tau is None:
            self.tau = nn.Parameter(torch.zeros_like(self.weight), requires_grad=self.weight.requires_grad)
        return self

    def add_learned_eps(self) -> "FilterResponseNorm2d":
        """Learn eps_l (init 1e-4) in place, with the device, dtype and requires_grad of the weight."""
        if self.eps_l is None:
            init = torch.full((), 1e-4, device=self.weight.device, dtype=self.weight.dtype)
            self.eps_l = nn.Parameter(init, requires_grad=self.weight.requires_grad)
        return self

    def forward(self, x):
        if not torch.jit.is_scripting():
            self._check_input(x)
        if self.impl == "op":
            return torch.ops.frn_det.frn(x, self.weight, self.bias, self.tau, self.eps, self.eps_l)[0]
        return frn_math(x, self.weight, self.bias, self.tau, self.eps, self.eps_l)

    @torch.jit.unused
    def _check_input(self, x):
        if x.dim() == 4 and x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels")
        if self.impl == "reference":  # the op checks its arguments in C++ (see frn_fused)
            _check_eager(x, self.weight, self.bias, self.tau, self.eps, self.eps_l)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, learned_eps={self.eps_l is not None}, "
                f"tlu={self.tau is not None}, impl={self.impl}")


class TLU(nn.Module):
    """Thresholded Linear Unit ``max(x, tau)`` with a per-channel ``tau`` (init 0).

    Used alone where an activation follows a residual add. At ties the gradient goes to ``x``.
    """

    def __init__(self, num_features: int, device=None, dtype=None):
        super().__init__()
        self.num_features = num_features
        self.tau = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, x):
        if not torch.jit.is_scripting():
            self._check_input(x)
        return tlu(x, self.tau.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2)))

    @torch.jit.unused
    def _check_input(self, x):
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"TLU({self.num_features}) expects (N, {self.num_features}, ...) input, got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return str(self.num_features)

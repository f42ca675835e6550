"""Filter Response Normalization (FRN) and the Thresholded Linear Unit (TLU).

Per sample ``n`` and channel ``c`` (arXiv 1911.09737)::

    nu2 = mean_{h,w} x^2            (no mean subtraction, no pooling over the batch)
    y   = weight * x / sqrt(nu2 + eps_eff) + bias,     eps_eff = eps + |eps_l|
    z   = max(y, tau)               (TLU; omitted when tau is None)

Gradient tie rule: where ``y == tau`` the TLU passes the gradient to ``y`` (the paper's
convention), never to ``tau``.

Two implementations compute the same function:

* ``"op"``: the fused custom op ``torch.ops.frn_det.frn`` (C++ CPU and CUDA kernels, fp32
  accumulation for fp16/bf16 inputs), see ``frn_det/layers/ops.py``;
* ``"reference"``: plain PyTorch, used by the tests and benchmarks as ground truth.

The implementation is picked by the ``impl`` argument, else by the environment variable
``FRN_DET_IMPL`` (``auto`` | ``op`` | ``reference``); ``auto`` (the default) uses the op when the
compiled extension is present and falls back to the reference otherwise.
"""
import os
from typing import Optional

import torch
from torch import nn

IMPLS = ("auto", "op", "reference")


def resolve_impl(impl: Optional[str] = None) -> str:
    """Return "op" or "reference" for ``impl`` (None reads ``FRN_DET_IMPL``)."""
    from . import ops

    name = (impl or os.environ.get("FRN_DET_IMPL", "auto")).lower()
    if name not in IMPLS:
        raise ValueError(f"unknown FRN implementation {name!r}; expected one of {IMPLS}")
    if name == "auto":
        return "op" if ops.is_available() else "reference"
    if name == "op" and not ops.is_available():
        raise RuntimeError(f"FRN implementation 'op' requested but frn_det._C is not built: {ops.load_error()}")
    return name


def check_frn_args(x, weight, bias, tau=None, eps_l=None) -> None:
    """Reject bad input with an error naming the problem (shared by both implementations)."""
    if x.dim() != 4:
        raise ValueError(f"FRN expects a 4D input (N, C, H, W), got a {x.dim()}D tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"FRN expects a floating-point input, got {x.dtype}")
    channels = x.shape[1]
    for name, p in (("weight", weight), ("bias", bias), ("tau", tau)):
        if p is None:
            continue
        if p.dim() != 1 or p.shape[0] != channels:
            raise ValueError(f"FRN {name} must have shape ({channels},) to match the input's {channels} channels, got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"FRN {name} is on {p.device} but the input is on {x.device}")
        if not p.is_floating_point():
            raise TypeError(f"FRN {name} must be floating point, got {p.dtype}")
    if eps_l is not None:
        if eps_l.numel() != 1:
            raise ValueError(f"FRN eps_l must be a scalar tensor, got shape {tuple(eps_l.shape)}")
        if eps_l.device != x.device:
            raise ValueError(f"FRN eps_l is on {eps_l.device} but the input is on {x.device}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def frn_reference(x, weight, bias, tau=None, eps: float = 1e-6, eps_l=None):
    """FRN (+ TLU when ``tau`` is given) in plain PyTorch ops; same contract as :func:`frn`."""
    check_frn_args(x, weight, bias, tau, eps_l)
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)  # upcast before squaring: fp16 x^2 overflows for |x| >= 256
    nu2 = xa.square().mean(dim=(2, 3), keepdim=True)
    eps_eff = eps + eps_l.to(acc).abs().reshape(()) if eps_l is not None else eps
    y = xa * torch.rsqrt(nu2 + eps_eff) * weight.to(acc).view(1, -1, 1, 1) + bias.to(acc).view(1, -1, 1, 1)
    if tau is not None:
        t = tau.to(acc).view(1, -1, 1, 1)
        y = torch.where(y >= t, y, t)
    return y.to(x.dtype)


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
    """
    if resolve_impl(impl) == "reference":
        return frn_reference(x, weight, bias, tau, eps, eps_l)
    from . import ops

    check_frn_args(x, weight, bias, tau, eps_l)
    return ops.frn_op(x, weight, bias, tau, eps, eps_l)


class FilterResponseNorm2d(nn.Module):
    """FRN over (N, C, H, W) inputs with an optional fused TLU.

    Args:
        num_features: number of channels C.
        eps: fixed epsilon (default 1e-6).
        learned_eps: add a learned scalar ``eps_l`` (init 1e-4); effective eps = eps + |eps_l|.
            The paper's remedy for 1x1 planes, where FRN with a tiny eps degenerates to sign(x).
        tlu: fuse the TLU ``max(y, tau)``; when False the module is FRN alone and ``tau`` is None.
        impl: implementation override ("op", "reference", "auto"); None reads ``FRN_DET_IMPL``.

    Parameters: ``weight`` (gamma, init 1), ``bias`` (beta, init 0), ``tau`` (init 0) and ``eps_l``.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learned_eps: bool = False, tlu: bool = True,
                 impl: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if impl is not None and impl.lower() not in IMPLS:
            raise ValueError(f"unknown FRN implementation {impl!r}; expected one of {IMPLS}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.impl = impl
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

    def forward(self, x):
        if x.dim() == 4 and x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels")
        return frn(x, self.weight, self.bias, self.tau, self.eps, self.eps_l, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, learned_eps={self.eps_l is not None}, "
                f"tlu={self.tau is not None}")


class TLU(nn.Module):
    """Thresholded Linear Unit ``max(x, tau)`` with a per-channel ``tau`` (init 0).

    Used alone where an activation follows a residual add. At ties the gradient goes to ``x``.
    """

    def __init__(self, num_features: int, device=None, dtype=None):
        super().__init__()
        self.num_features = num_features
        self.tau = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, x):
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"TLU({self.num_features}) expects (N, {self.num_features}, ...) input, got shape {tuple(x.shape)}")
        t = self.tau.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        return torch.where(x >= t, x, t)

    def extra_repr(self) -> str:
        return str(self.num_features)

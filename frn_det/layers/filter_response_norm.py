"""Filter Response Normalization (FRN) and the Thresholded Linear Unit (TLU).

Per sample ``n`` and channel ``c`` (arXiv 1911.09737)::

    nu2 = mean_{h,w} x^2            (no mean subtraction, no pooling over the batch)
    y   = weight * x / sqrt(nu2 + eps_eff) + bias,     eps_eff = eps + |eps_l|
    z   = max(y, tau)               (TLU; omitted when tau is None)

Two variants, for the study of why FRN trails GroupNorm (docs/results.md), are explicit options;
without them the function is the paper's FRN:

* ``num_groups=G``: the statistic is pooled over G groups of C/G channels (GroupNorm's grouping)
  instead of one per channel: ``nu2 = mean_{c in group, h, w} x^2``;
* ``centered=True``: the (group's or channel's) mean is subtracted first,
  ``y = weight * (x - mu) / sqrt(var + eps_eff) + bias`` with the biased variance, as GroupNorm
  (G groups) and InstanceNorm (per channel) do; the TLU follows as placed.

The fused ops compute the paper's FRN (``torch.ops.frn_det.frn``, CPU and CUDA) and the per-channel
centred variant (``torch.ops.frn_det.frn_centered``, CPU kernels only: on CUDA ``auto`` runs the
reference, and ``op`` raises NotImplementedError). Grouped variants run in the reference
implementation, where a centred variant with a fixed eps takes its statistics from torch's GroupNorm
kernel, as fast as GroupNorm itself, and with a learned eps from plain ops. Under ONNX export and
torch.export the centred variant records the reference's operators (the paper's op records itself
and exports through onnx_export's translations); a torch.jit.trace records either op.

A 1x1 plane (or any constant plane) has variance 0 in the centred variant: its output is exactly
``bias`` before the TLU (given eps + |eps_l| > 0), on both implementations.

Gradient tie rule: where ``y == tau`` the TLU passes the gradient to ``y`` (the paper's
convention), never to ``tau``. A NaN ``y`` stays NaN through the TLU (as through torch.maximum and
ReLU), forward and backward, in both implementations.

Two implementations compute the same function:

* ``"op"``: the fused custom ops ``torch.ops.frn_det.frn`` / ``frn_centered`` (C++ kernels, fp32
  accumulation for fp16/bf16 inputs), see ``frn_det/layers/ops.py``;
* ``"reference"``: plain PyTorch, used by the tests and benchmarks as ground truth, and the
  implementation of the variants.

The implementation is picked by the ``impl`` argument, else by the environment variable
``FRN_DET_IMPL`` (``auto`` | ``op`` | ``reference``); ``auto`` (the default) uses the op when the
compiled extension is present and falls back to the reference otherwise. The functional
:func:`frn` resolves it on every call, a :class:`FilterResponseNorm2d` once, when it is built.
"""
import os
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

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


def _rstd(nu2: torch.Tensor, eps: float, eps_l: Optional[torch.Tensor]) -> torch.Tensor:
    """1 / sqrt(nu2 + eps + |eps_l|)."""
    if eps_l is not None:
        return torch.rsqrt(nu2 + (eps + eps_l.to(nu2.dtype).abs().reshape(())))
    return torch.rsqrt(nu2 + eps)


def _frn_math(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tau: Optional[torch.Tensor], eps: float,
              eps_l: Optional[torch.Tensor], num_groups: int = 0, centered: bool = False) -> torch.Tensor:
    """The reference's arithmetic without the argument checks (TorchScript compiles this);
    ``num_groups`` 0 is one statistic per channel."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)  # upcast before squaring: fp16 x^2 overflows for |x| >= 256
    if centered and eps_l is None and x.shape[2] * x.shape[3] > 0:
        # GroupNorm's own kernel (C groups: per channel) computes the same formula, affine included
        y = F.group_norm(xa, num_groups if num_groups else x.shape[1], weight.to(acc), bias.to(acc), eps)
    else:
        y = _normalized(x, xa, eps, eps_l, num_groups, centered) * weight.to(acc).view(1, -1, 1, 1) \
            + bias.to(acc).view(1, -1, 1, 1)
    if tau is not None:
        y = tlu(y, tau.to(acc).view(1, -1, 1, 1))
    return y.to(x.dtype)


def _normalized(x: torch.Tensor, xa: torch.Tensor, eps: float, eps_l: Optional[torch.Tensor], num_groups: int,
                centered: bool) -> torch.Tensor:
    """x (upcast: xa) divided by the root of its plane's (or group's) mean square plus eps, its mean
    subtracted first when centred; in x's memory format."""
    if num_groups == 0 and not centered:
        # sum / L rather than mean: an empty plane (H*W = 0) has nu2 = 0, as in the kernels, so its
        # (absent) output has finite, zero gradients
        nu2 = xa.square().sum(dim=(2, 3), keepdim=True) / max(x.shape[2] * x.shape[3], 1)
        return xa * _rstd(nu2, eps, eps_l)
    n, c, h, w = xa.shape
    groups = c if num_groups == 0 else num_groups
    xg = xa.reshape(n, groups, (c // groups) * h * w)
    count = max(xg.shape[2], 1)
    if centered:
        xg = xg - xg.sum(dim=2, keepdim=True) / count
    nu2 = xg.square().sum(dim=2, keepdim=True) / count
    xn = (xg * _rstd(nu2, eps, eps_l)).reshape(n, c, h, w)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        xn = xn.contiguous(memory_format=torch.channels_last)
    return xn


def _check_variant(channels: int, num_groups: Optional[int]) -> int:
    """``num_groups`` as _frn_math takes it (0: per channel); ValueError unless it divides ``channels``."""
    if num_groups is None:
        return 0
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or channels % num_groups:
        raise ValueError(f"frn: num_groups must be a positive divisor of the {channels} channels, got {num_groups!r}")
    return num_groups


def frn_reference(x, weight, bias, tau=None, eps: float = 1e-6, eps_l=None, num_groups: Optional[int] = None,
                  centered: bool = False):
    """FRN (+ TLU when ``tau`` is given) in plain PyTorch ops; same contract as :func:`frn`."""
    _check_eager(x, weight, bias, tau, eps, eps_l)
    groups = _check_variant(x.shape[1], num_groups)
    return _frn_math(x, weight, bias, tau, eps, eps_l, groups, bool(centered))


def _frn_fused(x, weight, bias, tau, eps, eps_l):
    # No Python checks: the op's C++ prologue raises the same errors (a Python check per call cost
    # as much host time as the CUDA kernels take on small maps).
    return torch.ops.frn_det.frn.default(x, weight, bias, tau, float(eps), eps_l)[0]


def _frn_centered_fused(x, weight, bias, tau, eps, eps_l):
    return torch.ops.frn_det.frn_centered.default(x, weight, bias, tau, float(eps), eps_l)[0]


_IMPL_FUNCTIONS = {"op": _frn_fused, "reference": frn_reference}

# The devices with kernels of the centred op (frn_centered); elsewhere "auto" runs the reference.
CENTERED_OP_DEVICES = ("cpu",)


def _centered_op_missing(device_type: str) -> str:
    return (f"the fused centred op (frn_centered) has no {device_type} kernels yet (CPU only); run the centred "
            f"variant with impl 'reference' or 'auto' on {device_type}")


def _exporting() -> bool:
    """Under ONNX export (either exporter) or torch.export, not under torch.compile: the centred
    variant then records the reference's operators, which every exporter translates. (A
    torch.jit.trace records the op, as the paper's op is recorded: the trace runs what eager runs.)"""
    if torch.compiler.is_exporting():
        return True
    if torch.compiler.is_compiling():
        return False
    return torch.onnx.is_in_onnx_export()


def _resolve_for(impl: Optional[str], num_groups: Optional[int], centered: bool) -> str:
    """The implementation that computes FRN with these options: the op serves the paper's FRN and
    the per-channel centred variant (on the CPU: see _centered_impl); grouped variants run the reference."""
    if num_groups is None:
        return resolve_impl(impl)
    name = (impl or os.environ.get("FRN_DET_IMPL", "auto")).lower()
    if name == "op":
        raise ValueError("the fused FRN ops compute the paper's per-channel statistics and their centred variant; "
                         "num_groups runs in the reference implementation (impl 'reference' or 'auto')")
    resolve_impl(name)  # rejects unknown names
    return "reference"


def _centered_impl(resolved: str, explicit_op: bool, x) -> str:
    """Where a per-channel centred call resolved to ``resolved`` runs for this ``x``: the op on a
    device with its kernels, else the reference ("auto") or NotImplementedError (impl "op")."""
    if resolved != "op":
        return resolved
    if x.device.type not in CENTERED_OP_DEVICES:
        if explicit_op:
            raise NotImplementedError(_centered_op_missing(x.device.type))
        return "reference"
    return "reference" if _exporting() else "op"


def _requested(impl: Optional[str]) -> str:
    return (impl or os.environ.get("FRN_DET_IMPL", "auto")).lower()


def frn(x, weight, bias, tau=None, eps: float = 1e-6, eps_l=None, impl: Optional[str] = None,
        num_groups: Optional[int] = None, centered: bool = False):
    """Filter Response Normalization, optionally fused with TLU.

    Args:
        x: input of shape (N, C, H, W), N >= 0, any floating dtype; contiguous or channels_last.
        weight, bias: per-channel gamma and beta, shape (C,).
        tau: per-channel TLU threshold, shape (C,); None for FRN without TLU.
        eps: fixed epsilon added to the mean square.
        eps_l: optional learned scalar; the effective epsilon is ``eps + |eps_l|``.
        impl: "op", "reference" or "auto"; None reads ``FRN_DET_IMPL`` (default "auto").
        num_groups: None (the paper's FRN: one statistic per sample and channel) or G, a divisor of
            C: one statistic per sample and group of C/G channels (a variant; reference only).
        centered: subtract the mean of each plane (or group) and divide by its standard deviation
            (a variant). Per channel it runs the fused op on the CPU ("op" or "auto"; on CUDA "auto"
            runs the reference and "op" raises NotImplementedError); ``num_groups=G, centered=True``
            is GroupNorm followed by TLU (reference).

    Returns:
        Tensor with the input's shape, dtype and memory format. Statistics accumulate in fp32
        (fp64 for fp64 input).

    The parameters may have another floating dtype than ``x`` (fp32 parameters with fp16/bf16
    activations, as under autocast): the output takes x's dtype, each gradient its tensor's dtype.
    Bad arguments raise ValueError (shapes, devices, values) or TypeError (dtypes).
    """
    resolved = _resolve_for(impl, num_groups, centered)
    if centered and num_groups is None:
        if _centered_impl(resolved, _requested(impl) == "op", x) == "op":
            return _frn_centered_fused(x, weight, bias, tau, eps, eps_l)
        return frn_reference(x, weight, bias, tau, eps, eps_l, None, True)
    variant = (num_groups, centered) if num_groups is not None or centered else ()
    return _IMPL_FUNCTIONS[resolved](x, weight, bias, tau, eps, eps_l, *variant)


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
        num_groups, centered: the variants of :func:`frn` (default: the paper's FRN). A grouped
            layer resolves "auto" to "reference"; a per-channel centred one to "op" where the op is
            built, which runs the fused centred op on CPU inputs and, with "auto", the reference on
            others (with "op" they raise NotImplementedError), and records the reference's
            operators under ONNX export and torch.export.

    Parameters: ``weight`` (gamma, init 1), ``bias`` (beta, init 0), ``tau`` (init 0) and ``eps_l``.
    :meth:`add_tlu` and :meth:`add_learned_eps` add the last two in place after construction.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learned_eps: bool = False, tlu: bool = True,
                 impl: Optional[str] = None, num_groups: Optional[int] = None, centered: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.num_groups = _check_variant(num_features, num_groups)  # 0: per channel (TorchScript needs an int)
        self.centered = bool(centered)
        self.impl = _resolve_for(impl, num_groups, centered)
        # A centred op layer on a device without the centred op's kernels: the reference ("auto")
        # or an error (impl "op").
        self.strict_op = _requested(impl) == "op"
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
            if not self.centered:
                return torch.ops.frn_det.frn(x, self.weight, self.bias, self.tau, self.eps, self.eps_l)[0]
            if torch.jit.is_scripting():
                if x.device.type == "cpu":
                    return torch.ops.frn_det.frn_centered(x, self.weight, self.bias, self.tau, self.eps, self.eps_l)[0]
                if self.strict_op:
                    raise NotImplementedError("the fused centred op (frn_centered) has CPU kernels only; "
                                              "run the centred variant with impl 'reference' or 'auto' elsewhere")
            elif _centered_impl("op", self.strict_op, x) == "op":
                return torch.ops.frn_det.frn_centered(x, self.weight, self.bias, self.tau, self.eps, self.eps_l)[0]
        return _frn_math(x, self.weight, self.bias, self.tau, self.eps, self.eps_l, self.num_groups, self.centered)

    @torch.jit.unused
    def _check_input(self, x):
        if x.dim() == 4 and x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels")
        if self.impl == "reference":  # the op checks its arguments in C++ (see frn)
            _check_eager(x, self.weight, self.bias, self.tau, self.eps, self.eps_l)

    def extra_repr(self) -> str:
        variant = (f", num_groups={self.num_groups}" if self.num_groups else "") + (", centered=True" if self.centered else "")
        return (f"{self.num_features}, eps={self.eps}, learned_eps={self.eps_l is not None}, "
                f"tlu={self.tau is not None}{variant}, impl={self.impl}")


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

"""The one validator of FRN arguments, shared by the reference, the op wrapper and the op's fake kernels.

Written with ``torch._check_value`` / ``torch._check_type`` so that it also runs on fake tensors
(torch.compile tracing, meta). One exception type per kind of mistake, the same on every path,
including the op's C++ checks (``TORCH_CHECK_VALUE`` / ``TORCH_CHECK_TYPE`` in csrc/frn.cpp, with
the same messages): ValueError for shapes, devices and values, TypeError for dtypes.
"""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_NAMES = "float16, bfloat16, float32 or float64"


# The centred op's per-plane mean (frn_centered): float64 for every input dtype (csrc/frn.h, centred_mean_type).
CENTERED_MEAN_DTYPE = torch.float64


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in fp64 for fp64 input, fp32 otherwise (fp16 x^2 overflows at |x| >= 256)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_float(name, t):
    torch._check_type(t.dtype in FLOAT_DTYPES, lambda: f"frn: {name} must be {_FLOAT_NAMES}, got {t.dtype}")


def _check_device(name, t, x):
    torch._check_value(t.device == x.device, lambda: f"frn: {name} is on {t.device} but x is on {x.device}")


def check_frn_args(x, weight, bias, tau=None, eps=0.0, eps_l=None) -> None:
    """Raise ValueError / TypeError naming the argument at fault; returns None when all is well."""
    torch._check_value(x.dim() == 4,
                       lambda: f"frn: x must be 4D (N, C, H, W), got {x.dim()}D with shape {tuple(x.shape)}")
    _check_float("x", x)
    channels = x.shape[1]
    for name, p in (("weight", weight), ("bias", bias), ("tau", tau)):
        if p is None:
            continue
        torch._check_value(
            p.dim() == 1 and p.shape[0] == channels,
            lambda: f"frn: {name} must have shape ({channels},) to match the input's {channels} channels, "
                    f"got shape {tuple(p.shape)}")
        _check_float(name, p)
        _check_device(name, p, x)
    if eps_l is not None:
        torch._check_value(eps_l.numel() == 1, lambda: f"frn: eps_l must be a scalar tensor, got shape {tuple(eps_l.shape)}")
        _check_float("eps_l", eps_l)
        _check_device("eps_l", eps_l, x)
    torch._check_value(eps >= 0, lambda: f"frn: eps must be >= 0, got {eps}")


def check_frn_backward_args(grad_out, x, weight, bias, tau, rstd, eps_l, mean=None) -> None:
    """``check_frn_args`` plus the backward's own inputs (grad_out like x, rstd (N, C) in the accumulation
    dtype; for frn_centered_backward, ``mean`` (N, C) float64, and the messages name that op)."""
    op = "frn_backward" if mean is None else "frn_centered_backward"
    check_frn_args(x, weight, bias, tau, 0.0, eps_l)
    torch._check_value(grad_out.shape == x.shape,
                       lambda: f"{op}: grad_out has shape {tuple(grad_out.shape)} but x has shape {tuple(x.shape)}")
    torch._check_type(grad_out.dtype == x.dtype, lambda: f"{op}: grad_out is {grad_out.dtype} but x is {x.dtype}")
    _check_device("grad_out", grad_out, x)
    stats = [("rstd", rstd, accumulation_dtype(x.dtype))]
    if mean is not None:
        stats.insert(0, ("mean", mean, CENTERED_MEAN_DTYPE))
    for name, t, dtype in stats:
        torch._check_value(
            t.dim() == 2 and t.shape[0] == x.shape[0] and t.shape[1] == x.shape[1],
            lambda: f"{op}: {name} must have shape (N, C) = ({x.shape[0]}, {x.shape[1]}), got {tuple(t.shape)}")
        torch._check_type(t.dtype == dtype, lambda: f"{op}: {name} must be {dtype} for {x.dtype} input, got {t.dtype}")
        _check_device(name, t, x)

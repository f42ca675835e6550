"""The op's kernel paths as shapes that reach them, for the tests (tests/test_frn_op.py keeps the
table of path -> test) and for tools/gpu_check.sh, which runs every path under compute-sanitizer.

The CUDA launcher picks a path from the shape and layout (frn_det/layers/csrc/cuda/frn_kernel.cu):
a warp per plane up to 1024 elements, a block per plane when there are at least 2 x SMs planes,
else the split path; channels_last input (C > 1, H*W > 1) always takes the split path. The CPU
kernels have their own paths (fused per plane or sample, or split into chunks / row blocks).
"""
import torch

from frn_det.layers import ops  # noqa: F401  (loads frn_det._C, which registers torch.ops.frn_det)

# One shape per CUDA path; with channels_last every shape with C > 1 and H*W > 1 is the NHWC split path.
CUDA_PATHS = {
    "warp_vec": (4, 16, 16, 16),  # L = 256: 16-byte loads in every dtype
    "warp_scalar": (64, 32, 7, 7),  # L = 49
    "warp_partial": (1, 13, 8, 8),  # 13 planes: the second 8-plane group is partly filled
    "block_vec": (2, 300, 40, 48),  # L = 1920, 600 planes >= 2 x SMs of GPUs with up to 300 SMs
    "block_scalar": (2, 300, 25, 41),  # L = 1025
    "split_nchw": (1, 2, 200, 336),  # few large planes
    "one_by_one": (2, 8, 1, 1),
    "empty_plane": (2, 3, 0, 4),
    "empty_batch": (0, 4, 3, 3),
    "empty_channels": (2, 0, 3, 3),
}


def set_test_limits(max_grid=0, force_int64=False):
    """Cap every CUDA grid dimension at ``max_grid`` (0: no cap) and/or force the 64-bit index
    kernels, so that small tensors reach the grid-stride loops and int64 paths of large ones."""
    torch.ops.frn_det._set_test_limits(max_grid, force_int64)


def exercise(device="cuda", dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    """Forward and backward (with and without grad_x) of the op on every path, layout, dtype and
    option, including the capped-grid and int64 variants; returns how many calls it made."""
    calls = 0
    limits = ((0, False), (1, False), (2, False), (0, True))
    for max_grid, force_int64 in limits:
        set_test_limits(max_grid, force_int64)
        try:
            for shape in CUDA_PATHS.values():
                for dtype in dtypes:
                    for channels_last in (False, True):
                        for tlu, learned_eps in ((True, False), (False, True)):
                            calls += _fwd_bwd(shape, dtype, channels_last, tlu, learned_eps, device)
        finally:
            set_test_limits(0, False)
    return calls


def _fwd_bwd(shape, dtype, channels_last, tlu, learned_eps, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    C = shape[1]
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.1
    w, b = w.to(device, pdtype), b.to(device, pdtype)
    tau = (torch.randn(C, generator=g) * 0.1).to(device, pdtype) if tlu else None
    eps_l = torch.tensor(1e-3, device=device, dtype=pdtype) if learned_eps else None
    out, rstd = torch.ops.frn_det.frn(x, w, b, tau, 1e-6, eps_l)
    grad_out = torch.randn_like(out)
    for grad_input in (True, False):
        torch.ops.frn_det.frn_backward(grad_out, x, w, b, tau, rstd, eps_l, grad_input)
    return 3

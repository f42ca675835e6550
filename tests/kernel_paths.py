"""The op's kernel paths as shapes that reach them, for the tests (tests/test_frn_op.py keeps the
table of path -> test) and for tools/gpu_check.sh, which runs every path under compute-sanitizer.

The CUDA launcher picks a path from the shape and layout (frn_det/layers/csrc/cuda/frn_kernel.cu,
plan_of; torch.ops.frn_det._cuda_plan names it): a warp per plane up to 1024 elements, a block per
plane when there are at least 2 x SMs planes, else the split path; channels_last input (C > 1,
H*W > 1) always takes the split path. With resident planes on (ops.cuda_resident_planes), NCHW
planes of up to 1024 elements take resident spans (several planes per block) and larger planes that
fit on chip the resident kernel: one block per plane, or a cluster of K blocks on sm_90+. The CPU
kernels have their own paths (fused per plane or sample, or split into chunks / row blocks).
"""
import contextlib

import torch

from frn_det.layers import ops  # loading it loads frn_det._C, which registers torch.ops.frn_det

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

# Shapes for the resident kernels (NCHW, resident planes on), and their plans on sm_90 (H100 / H200:
# 132 SMs, 228 KB shared memory per SM, 227 KB per block) by dtype, forward / backward. Resident
# planes need 2 * planes * K >= SMs, hence the channel counts. Elsewhere the plane shapes take one
# block per plane where it fits (sm_80 / sm_86 / sm_89 / sm_75), else the split path.
RESIDENT_PATHS = {
    "span_7x7": (64, 32, 7, 7),  # RoI planes: spans of many planes, 16-byte loads
    "span_tail": (1, 13, 7, 7),  # the last span ends mid-vector (element-wise tail)
    "span_1x1": (2, 8, 1, 1),
    "resident_vec": (2, 40, 40, 48),  # L = 1920: one block per plane, 16-byte loads
    "resident_scalar": (2, 40, 25, 41),  # L = 1025: one block per plane, scalar loads
    "resident_48k": (1, 66, 96, 128),  # fp32 forward: 48 KB of shared memory exactly
    "resident_cluster": (1, 40, 200, 336),  # P2 planes: clusters of 2-8 blocks
    "resident_max": (1, 9, 400, 672),  # the stem's planes: 8 blocks of up to 227 KB, or too large
}
R1 = ("resident:1", "resident:1")
RESIDENT_PLANS_SM90 = {
    "span_7x7": {"float32": ("span:8", "span:8"), "float16": ("span:8", "span:8"),  # 2 spans per SM
                 "bfloat16": ("span:8", "span:8"), "float64": ("span:8", "span:8")},
    "span_tail": {"float32": ("span:4", "span:4"), "float16": ("span:8", "span:8"),
                  "bfloat16": ("span:8", "span:8"), "float64": ("span:2", "span:2")},
    "span_1x1": {"float32": ("span:4", "span:4"), "float16": ("span:8", "span:8"),
                 "bfloat16": ("span:8", "span:8"), "float64": ("span:2", "span:2")},
    "resident_vec": {"float32": R1, "float16": R1, "bfloat16": R1, "float64": R1},
    "resident_scalar": {"float32": R1, "float16": R1, "bfloat16": R1, "float64": R1},
    "resident_48k": {"float32": ("resident:1", "resident:2"), "float16": R1, "bfloat16": R1,
                     "float64": ("resident:2", "resident:3")},
    "resident_cluster": {"float32": ("resident:4", "resident:8"), "float16": ("resident:2", "resident:4"),
                         "bfloat16": ("resident:2", "resident:4"), "float64": ("resident:8", "resident:8")},
    "resident_max": {"float32": ("resident:8", "split"), "float16": ("resident:8", "resident:8"),
                     "bfloat16": ("resident:8", "resident:8"), "float64": ("split", "split")},
}


def kernel_setting(path):
    """The kernel options a path of CUDA_PATHS / RESIDENT_PATHS runs under (a context manager)."""
    return ops.cuda_resident_planes(True) if path in RESIDENT_PATHS else contextlib.nullcontext()


def set_test_limits(max_grid=0, force_int64=False):
    """Cap every CUDA grid dimension at ``max_grid`` (0: no cap) and/or force the 64-bit index
    kernels, so that small tensors reach the grid-stride loops and int64 paths of large ones."""
    torch.ops.frn_det._set_test_limits(max_grid, force_int64)


def exercise(device="cuda", dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    """Forward and backward (with and without grad_x) of the op on every path, layout, dtype and
    option, including the capped-grid and int64 variants; returns how many calls it made. The
    resident paths run in NCHW only (channels_last input never takes them), uncapped and with a
    grid of 2 blocks or clusters (they have no int64 variant; their shapes are the largest here)."""
    calls = 0
    limits = ((0, False), (1, False), (2, False), (0, True))
    for max_grid, force_int64 in limits:
        set_test_limits(max_grid, force_int64)
        try:
            for path, shape in {**CUDA_PATHS, **RESIDENT_PATHS}.items():
                resident = path in RESIDENT_PATHS
                if resident and (max_grid, force_int64) not in ((0, False), (2, False)):
                    continue
                with kernel_setting(path):
                    for dtype in dtypes:
                        for channels_last in (False,) if resident else (False, True):
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

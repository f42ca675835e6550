"""pytest set-up: the `cuda`, `multi_gpu` and `slow` markers; FRN_DET_REQUIRE_CUDA=1, which turns
every skip of a CUDA test into a failure, so that a run on a GPU machine cannot pass by skipping (an
old driver makes torch.cuda.is_available() False); generated datasets and converted ground truth in
temporary caches (not ./datasets or ~/.cache), set before frn_det registers them; under make test's
parallel workers, torch's CPU threads shared out between them. pytest.ini puts the checkout on the
path (experiments/ and benchmarks/ are never installed)."""
import os
import tempfile

import pytest
import torch

os.environ.setdefault("FRN_DET_DATA", os.path.join(tempfile.gettempdir(), "frn_det_test_data", "frn_synthetic"))
os.environ.setdefault("FRN_DET_CACHE", os.path.join(tempfile.gettempdir(), "frn_det_test_cache"))
# Subprocesses (tools/train_net.py, ...) import this checkout's frn_det, not an install elsewhere;
# train_net_testing.assert_this_checkout checks their logs say so.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

REQUIRE_CUDA = os.environ.get("FRN_DET_REQUIRE_CUDA", "0") == "1"
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # make test's pytest-xdist workers
if WORKERS > 1:  # the CPUs shared out between them (torch's default would give each all of them)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device and frn_det._C built with its CUDA kernels")
    config.addinivalue_line("markers", "multi_gpu: needs two CUDA devices (skipped on one, even with FRN_DET_REQUIRE_CUDA)")
    config.addinivalue_line("markers", "slow: trains in a subprocess or dry-runs a script (the fast tier: -m 'not slow')")


def cuda_missing():
    """Why the CUDA tests cannot run here, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False)"
    from frn_det.layers import ops

    if not ops.is_available():
        return f"frn_det._C is not built: {ops.load_error()}"
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is None:
        return
    reason = cuda_missing()
    if reason is not None:
        if REQUIRE_CUDA:
            pytest.fail(f"FRN_DET_REQUIRE_CUDA=1 but this CUDA test cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    if item.get_closest_marker("multi_gpu") is not None and torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices, found {torch.cuda.device_count()}")

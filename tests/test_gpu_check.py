"""tools/gpu_check.sh: its dry run (no GPU visible) goes through every step on the CPU and writes
the report; on a GPU machine the same script is the verification (its report goes to docs/gpu.md)."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # subprocess runs (see tests/conftest.py: the fast tier is -m "not slow")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine gpu_check.sh is the real check, not a dry run")
def test_gpu_check_dry_run_writes_the_report(tmp_path):
    report = tmp_path / "gpu_check.md"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), str(report)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + (report.read_text() if report.exists() else "")
    text = report.read_text()
    assert "DRY RUN (no GPU visible)" in text and "**FAILED**" not in text
    for step in ("build", "tests", "kernel paths on the CPU", "benchmark", "profile"):
        assert f"| {step}" in text
    assert "tests collected" in text and "op calls" in text and "| op |" in text and "% columns are of that" in text
    # the profile names the op's own events and BatchNorm's, each under its wall time
    assert "fpn_p6 2x256x13x21, op: " in text and "fpn_p6 2x256x13x21, BatchNorm2d+ReLU: " in text
    assert "frn_det::frn_backward" in text and "aten::native_batch_norm" in text
    assert "Warning" not in text

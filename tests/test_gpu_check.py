"""tools/gpu_check.sh: its dry run (no GPU visible) goes through every step on the CPU and writes
the report; on a GPU machine the same script is the verification (its report goes to docs/gpu.md)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # subprocess runs (see tests/conftest.py: the fast tier is -m "not slow")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine gpu_check.sh is the real check, not a dry run")
def test_gpu_check_dry_run_writes_the_report(tmp_path):
    report = tmp_path / "gpu_check.md"
    # no wheelhouse: a checkout's .whl/ holds the device's (Python 3.12) wheels; the step has its own test below
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", WHEELHOUSE=str(tmp_path / "no_wheels"))
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), str(report)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + (report.read_text() if report.exists() else "")
    text = report.read_text()
    assert "DRY RUN (no GPU visible)" in text and "**FAILED**" not in text
    for step in ("build", "tests", "training step benchmark", "short training", "kernel paths on the CPU",
                 "op benchmark", "op memory floor", "profile"):
        assert f"| {step}" in text
    # the detectron2 training step: every variant of both models timed with AMP off, AMP named as skipped on the CPU
    assert text.count("| FRN (op) | off |") == 2 and text.count("skipped: detectron2's AMPTrainer requires CUDA") == 8
    step_results = [r for r in json.loads((tmp_path / "gpu_check_step.json").read_text()) if not r["skipped"]]
    assert {(r["model"], r["variant"]) for r in step_results if r["median_s"] > 0} == {
        (m, v) for m in ("retinanet", "mask_rcnn") for v in ("BN", "GN", "FRN (op)", "FRN (reference)")}
    assert "| FRN fp32 |" in text and "no result" not in text  # the short training trained and evaluated
    assert "| op / floor | % of floor |" in text
    # fp32, then fp16 and bf16 as AMP runs them, in the op benchmark (2 layouts) and the floor (1)
    amp = ", {} with fp32 parameters (AMP: autocast)"
    assert text.count(amp.format("bfloat16")) == 3 and text.count(amp.format("float16")) == 3
    assert "| op benchmark (kernel time) | skipped: CUDA graphs need a GPU |" in text
    assert "tests collected" in text and "op calls" in text and "| op |" in text and "% columns are of that" in text
    # the profile names the op's own events and BatchNorm's, each under its wall time
    assert "fpn_p6 2x256x13x21, op: " in text and "fpn_p6 2x256x13x21, BatchNorm2d+ReLU: " in text
    assert "frn_det::frn_backward" in text and "aten::native_batch_norm" in text
    assert "Warning" not in text


WHEELHOUSE_IMPORTS = """
import importlib.machinery, os, sys
site = os.environ["WHEEL_SITE"]
# What the wheelhouse carries must come from it (this environment has them all installed too), but
# pycocotools: its wheel is compiled for CPython 3.12, this is 3.11.
CARRIED = {"detectron2", "fvcore", "iopath", "yacs", "termcolor", "omegaconf", "hydra", "antlr4"}
class FromWheelhouseOnly:
    def find_spec(self, name, path=None, target=None):
        if name in CARRIED:
            spec = importlib.machinery.PathFinder.find_spec(name, [site])
            if spec is None:
                raise ImportError(f"{name} is not in the wheelhouse")
            return spec
sys.meta_path.insert(0, FromWheelhouseOnly())
"""


def test_gpu_wheelhouse_installs_detectron2_without_an_index(tmp_path):
    """tools/gpu_wheelhouse.sh's wheels install as gpu_check.sh installs them (no index, no
    dependencies resolved, into a folder on PYTHONPATH), and tools/train_net.py trains and evaluates
    with detectron2 and every package the wheelhouse carries imported from there."""
    wheels, site, guard = tmp_path / "whl", tmp_path / "site", tmp_path / "guard"
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_wheelhouse.sh"), str(wheels)], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=600)
    assert sum(f.stat().st_size for f in wheels.iterdir()) < 32 << 20  # well inside the 64 MiB a device call carries
    # as the device's Python 3.12 would take them: every wheel must be one for CPython 3.12 on x86-64 Linux
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "--only-binary=:all:", *map(str, sorted(wheels.glob("*.whl")))], check=True, capture_output=True,
                   timeout=300)
    for compiled in site.glob("pycocotools*"):  # for CPython 3.12: this 3.11 takes its own
        shutil.rmtree(compiled)
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(WHEELHOUSE_IMPORTS)
    from train_net_testing import dataset_args, run_opts, tiny_dataset
    data = str(tmp_path / "data")
    tiny_dataset(data)
    check = "import detectron2, fvcore, hydra, antlr4; print('from', detectron2.__file__)"
    env = dict(os.environ, WHEEL_SITE=str(site), PYTHONPATH=os.pathsep.join([str(guard), str(site), REPO]),
               OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and f"from {site}" in p.stdout, p.stderr[-3000:]
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
                        os.path.join(REPO, "configs", "synthetic", "retinanet_R18_FPN_FRN.yaml"), *dataset_args(data),
                        *run_opts(tmp_path / "out")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "out" / "frn_det_result.json").exists()
    # gpu_check.sh's own wheels step, every other step skipped: pycocotools left out, its wheel is for 3.12
    for compiled in wheels.glob("pycocotools*"):
        compiled.unlink()
    report = tmp_path / "gpu_check.md"
    env = dict(os.environ, PYTHON=sys.executable, WHEELHOUSE=str(wheels),
               GPU_CHECK_SKIP="build tests step train memcheck bench floor profile")
    p = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), str(report)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    text = report.read_text()
    assert p.returncode == 0 and "| wheels (into a PYTHONPATH folder) | ok |" in text, text
    # from the folder the step installed into, not from this environment (which has detectron2 too)
    imported = re.search(r"detectron2 0\.7\.2 from (\S+) with numpy", text)
    assert imported and not imported.group(1).startswith(sys.prefix), text
    assert text.count("skipped (GPU_CHECK_SKIP)") == 8

"""Arguments of tiny tools/train_net.py runs (64x64 images, a few iterations, CPU) shared by the
tests that train in a subprocess, and the check that such a run imported this checkout's frn_det."""
import os
import subprocess
import sys

import pytest

from frn_det.data.synthetic import SyntheticSpec, generate


def tiny_dataset(root, num_train=4, num_val=2, seed=1, **spec):
    """A synthetic COCO dataset of 64x64 images under ``root`` (objects 8-21 px); returns ``root``."""
    generate(SyntheticSpec(num_train=num_train, num_val=num_val, image_size=64, min_size=8, max_size=21, seed=seed,
                           **spec), str(root), progress=False)
    return str(root)


def dataset_args(root, prefix="tiny"):
    return [
        "--dataset", f"{prefix}_train", os.path.join(root, "annotations", "instances_train.json"), os.path.join(root, "train"),
        "--dataset", f"{prefix}_val", os.path.join(root, "annotations", "instances_val.json"), os.path.join(root, "val"),
    ]


def run_opts(out, max_iter=4, prefix="tiny"):
    return [
        "DATASETS.TRAIN", f"('{prefix}_train',)", "DATASETS.TEST", f"('{prefix}_val',)",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", str(out),
    ]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


def train_net(*args, check=True, env=None):
    """tools/train_net.py in a subprocess, as users run it (``env``: extra environment variables);
    with ``check``, a failure fails the test with the tool's output, and the run must have imported
    this checkout's frn_det."""
    # One intra-op thread per process: the runs are tiny and the test machine is shared.
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, TRAIN_NET, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"train_net failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    if check:
        assert_this_checkout(proc.stdout + proc.stderr)
    return proc


THIS_CHECKOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "frn_det")


def assert_this_checkout(log_text):
    """A tool's log (stdout/stderr or log.txt) says it ran this checkout's frn_det, not a stale install."""
    line = next((ln for ln in log_text.splitlines() if "frn_det imported from " in ln), None)
    assert line is not None, "the log does not say which frn_det the tool imported"
    assert line.rstrip().endswith(f"frn_det imported from {THIS_CHECKOUT}"), line

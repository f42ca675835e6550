"""The fault suite: real tools/train_net.py (and lazy_train_net.py) runs killed at named points
(frn_det.kill_points: before a write, in the middle of one at a chosen byte, after the rename and
before last_checkpoint names the file), stopped by SIGTERM (one process and two gloo processes),
and resumed with --resume: nothing is lost, nothing is torn, and the resumed run ends bitwise
equal to the run that was not stopped."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from frn_det.atomic import temporary_name_of
from train_net_testing import REPO, assert_this_checkout, dataset_args, run_opts, tiny_dataset, train_net

pytestmark = pytest.mark.slow

RETINANET = os.path.join(REPO, "configs", "synthetic", "retinanet_R18_FPN_{}.yaml")
SIGKILLED, SIGTERMED = -signal.SIGKILL, 128 + signal.SIGTERM


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("faults_data"), num_train=6, num_val=2)


def _args(data, out, *flags, max_iter=6, norm="FRN", opts=()):
    # a data-loader worker process: it must stop with the training process
    return ["--config-file", RETINANET.format(norm), *dataset_args(data), *flags, *run_opts(out, max_iter=max_iter),
            "DATALOADER.NUM_WORKERS", "1", *opts]


def _weights(out):
    return torch.load(os.path.join(out, "model_final.pth"), weights_only=False)["model"]


def _assert_same_weights(a, b):
    a, b = _weights(a), _weights(b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _result(out):
    with open(os.path.join(out, "frn_det_result.json")) as f:
        return json.load(f)


def _trained_iterations(out):
    """The iterations of metrics.json's training records (detectron2's writer records every 20
    iterations and the last: [5] for these runs, [5, 5] when a resume records it twice)."""
    with open(os.path.join(out, "metrics.json")) as f:
        return [r["iteration"] for r in map(json.loads, f) if "total_loss" in r]


@pytest.fixture(scope="module")
def full(data, tmp_path_factory):
    """The run that is not stopped: 6 iterations, checkpoints after iterations 1, 3, 5."""
    out = tmp_path_factory.mktemp("full")
    train_net(*_args(data, out))
    return out


@pytest.mark.parametrize("point,resumes_at", [
    ("before-write:model_0000003.pth", 2),
    ("mid-write:model_0000003.pth:50000", 2),
    ("after-rename:model_0000003.pth", 2),  # on disk, but last_checkpoint still names model_0000001
    ("mid-write:last_checkpoint:4", 0),  # its first write: no last_checkpoint, so --resume starts anew
    ("mid-write:frn_det_result.json:10", 6),  # trained and saved: the resume evaluates and writes the result
], ids=["before_write", "mid_checkpoint", "after_rename", "mid_last_checkpoint", "mid_result"])
def test_a_run_killed_at_a_write_resumes_to_the_same_weights(data, full, tmp_path, point, resumes_at):
    out = tmp_path / "run"
    proc = train_net(*_args(data, out), env={"FRN_DET_KILL_AT": point}, check=False)
    assert proc.returncode == SIGKILLED, proc.stderr[-3000:]
    if resumes_at:  # last_checkpoint is whole and names a whole file
        torch.load(out / (out / "last_checkpoint").read_text(), weights_only=False)
    else:
        assert not os.path.exists(out / "last_checkpoint")
    assert not os.path.exists(out / "frn_det_result.json")  # absent, never torn
    proc = train_net(*_args(data, out, "--resume"))
    log = proc.stdout + proc.stderr
    assert f"Starting training from iteration {resumes_at}" in log or resumes_at == 6
    assert ("the temporary file of a write that did not finish" in log) == point.startswith("mid-write")
    assert not [n for n in os.listdir(out) if temporary_name_of(n)]
    _assert_same_weights(full, out)
    assert _result(out)["results"] == _result(full)["results"]
    assert _trained_iterations(out) == _trained_iterations(full) == [5]  # each iteration once in the curves


def test_a_run_killed_during_an_evaluation_evaluates_it_on_resume(data, full, tmp_path):
    out = tmp_path / "run"
    every_4 = ("TEST.EVAL_PERIOD", "4")
    proc = train_net(*_args(data, out, opts=every_4), env={"FRN_DET_KILL_AT": "evaluation:1"}, check=False)
    assert proc.returncode == SIGKILLED, proc.stderr[-3000:]
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"  # written before the evaluation
    proc = train_net(*_args(data, out, "--resume", opts=every_4))
    log = proc.stdout + proc.stderr
    assert "Starting training from iteration 4" in log and "The evaluation after iteration 4 is not in metrics.json" in log
    assert [p["iteration"] for p in _result(out)["curve"]] == [4, 6]
    _assert_same_weights(full, out)  # evaluating changes no weights and no random stream


def test_resume_past_a_damaged_newest_checkpoint_trims_the_metrics(data, full, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full, out)
    for name in ("model_final.pth", "frn_det_result.json", "inference"):  # a full disk while saving after iteration 5
        shutil.rmtree(out / name) if (out / name).is_dir() else os.remove(out / name)
    with open(out / "model_0000005.pth", "r+b") as f:
        f.truncate(50_000)
    (out / "last_checkpoint").write_text("model_0000005.pth")
    proc = train_net(*_args(data, out, "--resume"))
    log = proc.stdout + proc.stderr
    assert "--resume: skipped" in log and "model_0000005.pth is damaged" in log
    assert "Starting training from iteration 4" in log and "Dropped" in log
    _assert_same_weights(full, out)
    assert _trained_iterations(out) == _trained_iterations(full) == [5]


def test_damaged_weights_stop_the_run_naming_the_file(data, full, tmp_path):
    bad = tmp_path / "cut.pth"
    bad.write_bytes((full / "model_final.pth").read_bytes()[:50_000])
    proc = train_net(*_args(data, tmp_path / "out", opts=("MODEL.WEIGHTS", str(bad))), check=False)
    assert proc.returncode != 0
    assert f"{bad} is damaged (truncated or corrupt) or not a checkpoint" in proc.stderr


def test_sigterm_stops_with_a_checkpoint_and_resume_is_exact(data, full, tmp_path):
    out = tmp_path / "run"
    proc = train_net(*_args(data, out), env={"FRN_DET_KILL_AT": "iteration:2", "FRN_DET_KILL_WITH": "TERM"},
                     check=False)
    assert proc.returncode == SIGTERMED, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Stopped by SIGTERM after iteration 2" in log and "with --resume" in log
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not os.path.exists(out / "model_final.pth")
    proc = train_net(*_args(data, out, "--resume"))
    assert "Starting training from iteration 3" in proc.stdout + proc.stderr
    _assert_same_weights(full, out)
    assert _trained_iterations(out) == [2, 5]  # the stop's record, then the resumed run's: none twice


def test_two_processes_stop_together_when_only_the_launcher_gets_sigterm(data, tmp_path):
    """``kill <launcher pid>`` (Kubernetes, docker): the launcher forwards the request, both gloo
    processes stop after the same iteration with one checkpoint, and --resume ends bitwise equal to
    the two-process run that was not stopped."""
    two = dict(max_iter=4, norm="GN", opts=("MODEL.DEVICE", "cpu"))
    flags = ("--num-gpus", "2", "--dist-url", "auto")
    full = tmp_path / "full"
    train_net(*_args(data, full, *flags, **two))
    out = tmp_path / "run"
    proc = train_net(*_args(data, out, *flags, **two), check=False, env={
        "FRN_DET_KILL_AT": "iteration:1", "FRN_DET_KILL_WITH": "TERM", "FRN_DET_KILL_WHO": "parent"})
    assert proc.returncode == SIGTERMED, proc.stderr[-3000:]
    assert "Training stopped by SIGTERM: resume with the same command and --resume" in proc.stderr
    stopped = {line.split("after iteration ")[1].split()[0] for line in (proc.stdout + proc.stderr).splitlines()
               if "Stopped by SIGTERM after iteration" in line}
    with open(out / "log.txt.rank1") as f:
        stopped |= {line.split("after iteration ")[1].split()[0] for line in f if "Stopped by SIGTERM" in line}
    assert len(stopped) == 1, stopped  # both processes, one iteration
    proc = train_net(*_args(data, out, *flags, "--resume", **two))
    assert f"Starting training from iteration {int(stopped.pop()) + 1}" in proc.stdout + proc.stderr
    _assert_same_weights(full, out)


def test_lazy_train_net_stops_on_sigterm_and_resumes(data, tmp_path):
    out = tmp_path / "lazy"
    names = ("lazy_faults_train", "lazy_faults_val")
    argv = [sys.executable, os.path.join(REPO, "tools", "lazy_train_net.py"), "--config-file",
            os.path.join(REPO, "configs", "lazy", "retinanet_R18_FPN_FRN_synthetic.py"),
            *[a for split, name in zip(("train", "val"), names) for a in
              ("--dataset", name, os.path.join(data, "annotations", f"instances_{split}.json"), os.path.join(data, split))],
            f"dataloader.train.dataset.names={names[0]}", f"dataloader.test.dataset.names={names[1]}",
            "dataloader.train.num_workers=1", "dataloader.test.num_workers=0", "train.max_iter=4", "train.eval_period=4",
            "model.model.test_score_thresh=0.0", f"train.output_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                          env=dict(env, FRN_DET_KILL_AT="iteration:1", FRN_DET_KILL_WITH="TERM"))
    assert proc.returncode == SIGTERMED, proc.stderr[-3000:]
    assert_this_checkout(proc.stdout + proc.stderr)
    assert "Stopped by SIGTERM after iteration 1" in proc.stdout + proc.stderr
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    proc = subprocess.run(argv[:2] + ["--resume"] + argv[2:], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting training from iteration 2" in proc.stdout + proc.stderr
    assert _result(out)["max_iter"] == 4 and [c["iteration"] for c in _result(out)["curve"]] == [4]


def test_a_second_signal_stops_at_once():
    """The first SIGTERM is a request (the process goes on); the second ends it by the signal."""
    code = ("import time, sys; from frn_det.engine.preemption import _Handlers, _request_stop\n"
            "with _Handlers(_request_stop):\n"
            "    print('ready', flush=True)\n"
            "    while True: time.sleep(0.05)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None  # still running: a request
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    err = proc.stderr.read()
    assert "SIGTERM: finishing the current iteration" in err and "SIGTERM again: stopping at once" in err

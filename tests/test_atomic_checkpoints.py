"""Writes that cannot be half-done (frn_det.atomic) and damaged checkpoints named
(frn_det.engine.checkpoint), in one process on a small module; the kills of real runs are in
tests/test_faults.py."""
import errno
import json
import logging
import os
import stat
import subprocess
import sys

import pytest
import torch
from detectron2.engine import PeriodicCheckpointer
from torch import nn

from frn_det import atomic
from frn_det.engine.checkpoint import DamagedCheckpointError, ShapeCheckingCheckpointer, run_checkpoints
from frn_det.engine.results import read_metrics, trim_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _temporaries(folder):
    return [n for n in os.listdir(folder) if atomic.temporary_name_of(n)]


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with atomic.atomic_write(path) as f:
        f.write("new")
        assert path.read_text() == "old"  # not in place: the final name changes at the rename only
    assert path.read_text() == "new" and not _temporaries(tmp_path)
    # the final file has the permissions open() would give it, not mkstemp's 0600
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="in the middle"):
        with atomic.atomic_write(path) as f:
            f.write("half")
            raise RuntimeError("in the middle")
    assert path.read_text() == "old" and not _temporaries(tmp_path)
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic.atomic_write(path, "a"):
            pass


def test_a_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(2, 2)
    checkpointer = ShapeCheckingCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    before = (tmp_path / "model_0000001.pth").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file") \
            from OSError(errno.ENOSPC, "No space left on device")  # what torch.save raises on a full disk

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=f"no space left to write model_0000003.pth in {tmp_path}; the previous file"):
        checkpointer.save("model_0000003")
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == before


def test_max_to_keep_deletes_old_checkpoints_only_after_a_save_succeeded(tmp_path, monkeypatch):
    checkpointer = ShapeCheckingCheckpointer(nn.Linear(2, 2), str(tmp_path))
    periodic = PeriodicCheckpointer(checkpointer, period=1, max_iter=10, max_to_keep=1)
    periodic.step(0)
    periodic.step(1)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]

    def fails(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fails)
    with pytest.raises(OSError, match="no space left"):
        periodic.step(2)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_a_write_killed_midway_leaves_the_old_file_and_a_temporary_cleaned_on_the_next_start(tmp_path):
    """Kill point mid-write: the process is SIGKILLed after 1000 bytes of the new checkpoint are on
    disk; the final name still holds the old checkpoint, and the next checkpointer removes the torn
    temporary with a warning."""
    model = nn.Linear(64, 64)
    ShapeCheckingCheckpointer(model, str(tmp_path)).save("model_0000001")
    before = (tmp_path / "model_0000001.pth").read_bytes()
    code = ("import torch, sys; from torch import nn; from frn_det.engine.checkpoint import ShapeCheckingCheckpointer;"
            f"ShapeCheckingCheckpointer(nn.Linear(64, 64), {str(tmp_path)!r}).save('model_0000001')")
    env = dict(os.environ, FRN_DET_KILL_AT="mid-write:model_0000001.pth:1000", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    torn = _temporaries(tmp_path)
    assert len(torn) == 1 and os.path.getsize(tmp_path / torn[0]) == 1000
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("frn_det.engine.checkpoint").addHandler(handler)
    try:
        ShapeCheckingCheckpointer(model, str(tmp_path))
    finally:
        logging.getLogger("frn_det.engine.checkpoint").removeHandler(handler)
    assert not _temporaries(tmp_path)
    assert any(torn[0] in r.getMessage() and "did not finish" in r.getMessage() for r in records)


@pytest.fixture
def saved(tmp_path):
    """A checkpointer of a small module with checkpoints after iterations 1 and 3 (last_checkpoint: 3)."""
    model = nn.Linear(4, 4)
    checkpointer = ShapeCheckingCheckpointer(model, str(tmp_path))
    with torch.no_grad():
        model.weight.fill_(1.0)
    checkpointer.save("model_0000001", iteration=1)
    with torch.no_grad():
        model.weight.fill_(3.0)
    checkpointer.save("model_0000003", iteration=3)
    return model, checkpointer, tmp_path


def _truncate(path, size=100):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_damaged_weights_are_named(saved):
    model, checkpointer, folder = saved
    _truncate(folder / "model_0000003.pth")
    with pytest.raises(DamagedCheckpointError, match=f"{folder}/model_0000003.pth is damaged \\(truncated or corrupt\\) "
                       "or not a checkpoint"):
        checkpointer.load(str(folder / "model_0000003.pth"))
    (folder / "notes.pth").write_text("not a checkpoint at all")
    with pytest.raises(DamagedCheckpointError, match="notes.pth is damaged"):
        checkpointer.load(str(folder / "notes.pth"))
    torch.save([1, 2, 3], folder / "list.pth")
    with pytest.raises(DamagedCheckpointError, match="list.pth is not a checkpoint: it holds list"):
        checkpointer.load(str(folder / "list.pth"))


def test_resume_falls_back_to_the_newest_readable_checkpoint(saved):
    model, checkpointer, folder = saved
    _truncate(folder / "model_0000003.pth")
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("frn_det.engine.checkpoint").addHandler(handler)
    try:
        extra = checkpointer.resume_or_load("", resume=True)
    finally:
        logging.getLogger("frn_det.engine.checkpoint").removeHandler(handler)
    assert extra["iteration"] == 1 and torch.all(model.weight == 1.0)
    assert any("--resume: skipped" in r.getMessage() and "model_0000003.pth is damaged" in r.getMessage()
               and "Resuming from" in r.getMessage() and r.getMessage().endswith("model_0000001.pth instead.")
               for r in records)
    # last_checkpoint naming a file that is gone: the same fallback
    os.remove(folder / "model_0000003.pth")
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 1


def test_resume_refuses_naming_every_damaged_checkpoint(saved):
    _, checkpointer, folder = saved
    for name in ("model_0000001.pth", "model_0000003.pth"):
        _truncate(folder / name)
    with pytest.raises(DamagedCheckpointError, match=r"(?s)no readable checkpoint in .*model_0000003.pth is damaged"
                       r".*model_0000001.pth is damaged.*Remove last_checkpoint"):
        checkpointer.resume_or_load("", resume=True)


def test_run_checkpoints_are_newest_first_and_only_periodic_names(tmp_path):
    for name in ("model_0000002.pth", "model_final.pth", "model_0000010.pth", "other.pth", "model_10.pth"):
        (tmp_path / name).write_bytes(b"")
    names = lambda paths: [os.path.basename(p) for p in paths]  # noqa: E731
    assert names(run_checkpoints(str(tmp_path))) == ["model_final.pth", "model_0000010.pth", "model_0000002.pth"]
    assert names(run_checkpoints(str(tmp_path), before=str(tmp_path / "model_0000010.pth"))) == ["model_0000002.pth"]
    assert run_checkpoints(str(tmp_path / "absent")) == []


def test_trim_metrics_drops_records_after_the_checkpoint_and_torn_lines(tmp_path):
    lines = [json.dumps({"iteration": i, "total_loss": float(i)}) + "\n" for i in range(6)]
    (tmp_path / "metrics.json").write_text("".join(lines) + '{"iteration": 6, "tot')  # cut by a kill
    assert trim_metrics(str(tmp_path), 3) == 3
    assert [r["iteration"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3]
    assert (tmp_path / "metrics.json").read_text() == "".join(lines[:4])
    assert trim_metrics(str(tmp_path), 3) == 0

"""Training runs as subprocesses with their output in their run directory (`make demo`, and the
experiments' grid launcher): the command's log (LOG_FILE) and status (STATUS_FILE) beside the run."""
import json
import os
import subprocess
import time

from ..atomic import atomic_write

STATUS_FILE = "compare_ap_status.json"
LOG_FILE = "compare_ap_train.log"


def thread_env(threads=None):
    """This process's environment, with ``threads`` intra-op CPU threads for the runs when given."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_logged(cmd, rdir, env, timeout=None, cwd=None):
    """Runs ``cmd`` (from ``cwd``) with its output appended to rdir/LOG_FILE and its command, exit
    status and wall time in rdir/STATUS_FILE; returns (exit status or "timeout", wall seconds)."""
    os.makedirs(rdir, exist_ok=True)
    status = {"command": cmd, "returncode": None, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write_json(os.path.join(rdir, STATUS_FILE), status)
    t0 = time.time()
    with open(os.path.join(rdir, LOG_FILE), "a") as logf:
        try:
            rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=cwd, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
            logf.write(f"\nError: killed after {timeout} s\n")
    status.update(returncode=rc, wall_s=round(time.time() - t0, 1))
    _write_json(os.path.join(rdir, STATUS_FILE), status)
    return rc, status["wall_s"]


def read_status(run_dir):
    """The launch status run_logged left in ``run_dir`` ({"command", "returncode", ...}); None if none."""
    try:
        with open(os.path.join(run_dir, STATUS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tail_lines(path, n=40):
    """The last ``n`` lines of a text file (none when it cannot be read)."""
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def _write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1)

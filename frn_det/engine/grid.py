"""Launching a grid of configs x seeds through tools/train_net.py, one run after the other, resumably:
a run whose result file exists is skipped, an interrupted one resumes from its last checkpoint.
Each run directory also gets the command's status (STATUS_FILE) and log (LOG_FILE), which
:func:`frn_det.engine.compare.load_run` reads to say why a run failed."""
import concurrent.futures
import glob
import json
import os
import re
import subprocess
import sys
import threading
import time

from ..data import ensure_synthetic
from .compare import LOG_FILE, STATUS_FILE, load_run, write_all
from .config import load_cfg
from .config_grid import CPU_GRID_DIR, cpu_grid_parts
from .paths import REPO, TOOLS
from .results import RESULT_FILE

DEFAULT_TRAIN_NET = os.path.join(TOOLS, "train_net.py")


def run_dir_for(root, config_file, seed):
    """output root / <config folder>_<config name> / seed<k>."""
    stem = os.path.splitext(os.path.basename(config_file))[0]
    fam = os.path.basename(os.path.dirname(os.path.abspath(config_file)))
    return os.path.join(root, f"{fam}_{stem}", f"seed{seed}")


def train_command(config_file, seed, run_dir, opts=(), train_net=DEFAULT_TRAIN_NET, python=sys.executable):
    return [python, train_net, "--config-file", config_file, "--num-gpus", "1", "--resume",
            "SEED", str(seed), "OUTPUT_DIR", run_dir, *opts]


def launch_grid(configs, seeds, root, opts=(), train_net=DEFAULT_TRAIN_NET, python=sys.executable,
                dry_run=False, timeout=None, jobs=1, threads=None, keep_checkpoints=False, log=print):
    """Run every (config, seed) not finished yet, ``jobs`` at a time (each with ``threads`` CPU
    threads when given); a finished run keeps only model_final.pth unless ``keep_checkpoints``.
    Returns [(config, seed, dir)]."""
    # seed-major: an interrupted grid has whole sweeps rather than some configs with every seed
    plan = [(c, s, run_dir_for(root, c, s)) for s in seeds for c in configs]
    todo = []
    for i, (cfg, seed, rdir) in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)}] {cfg} seed {seed}"
        if os.path.isfile(os.path.join(rdir, RESULT_FILE)):
            log(f"{tag}: done already, skipped")
        elif dry_run:
            log(f"{tag}: would run {' '.join(train_command(cfg, seed, rdir, opts, train_net, python))}")
        else:
            todo.append((tag, train_command(cfg, seed, rdir, opts, train_net, python), rdir))
    if todo:  # generate a synthetic dataset once here, not in parallel runs
        datasets = set()
        for cfg_file in sorted({c for c, _, _ in plan}):
            try:
                cfg = load_cfg(cfg_file)
            except Exception:  # noqa: BLE001 (the run fails on it and its reason says why)
                continue
            datasets.update(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
        ensure_synthetic(sorted(datasets))
    env = thread_env(threads)
    lock = threading.Lock()

    def run_one(tag, cmd, rdir):
        with lock:
            log(f"{tag}: running -> {rdir}")
        rc, wall_s = run_logged(cmd, rdir, env, timeout)
        if rc == 0 and not keep_checkpoints:  # a finished run needs only its final model
            for name in os.listdir(rdir):
                if name.startswith("model_") and name.endswith(".pth") and name != "model_final.pth":
                    os.remove(os.path.join(rdir, name))
        with lock:
            log(f"{tag}: exit {rc} after {wall_s} s")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(run_one, *job) for job in todo]:
            future.result()
    return plan


def thread_env(threads=None):
    """This process's environment, with ``threads`` intra-op CPU threads for the runs when given."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_logged(cmd, rdir, env, timeout=None):
    """Runs ``cmd`` from the repository with its output appended to rdir/LOG_FILE and its command, exit
    status and wall time in rdir/STATUS_FILE; returns (exit status or "timeout", wall seconds)."""
    os.makedirs(rdir, exist_ok=True)
    status = {"command": cmd, "returncode": None, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write_json(os.path.join(rdir, STATUS_FILE), status)
    t0 = time.time()
    with open(os.path.join(rdir, LOG_FILE), "a") as logf:
        try:
            rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
            logf.write(f"\nError: killed after {timeout} s\n")
    status.update(returncode=rc, wall_s=round(time.time() - t0, 1))
    _write_json(os.path.join(rdir, STATUS_FILE), status)
    return rc, status["wall_s"]


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def collect_grid(configs, seeds, root):
    """(runs, expected): every planned run of the grid, loaded, and the number of seeds each group expects."""
    runs = [load_run(run_dir_for(root, cfg, s), config_file=cfg, seed=s) for cfg in configs for s in seeds]
    return runs, {r.key(): len(seeds) for r in runs if r.key() is not None}


def collect_cpu_grid(root, out_dir, log=print):
    """The CPU comparison of docs/results.md: every run under ``root`` (finished, failed or not
    finished) into out_dir/cpu_grid.*, and each of :func:`cpu_grid_parts` into out_dir/<part>.*."""
    seed_of = {d: int(m.group(1)) for d in glob.glob(os.path.join(root, "*", "seed*"))
               if os.path.isdir(d) and (m := re.fullmatch(r"seed(\d+)", os.path.basename(d)))}
    dirs = sorted(seed_of)  # run_dir_for's layout only: a stray seed0.bak or file is not a run
    runs = {d: load_run(d) for d in dirs}
    parts = {"cpu_grid": dirs}
    for name, (configs, seeds) in cpu_grid_parts().items():
        wanted = {os.path.dirname(run_dir_for(root, os.path.join(CPU_GRID_DIR, c), 0)) for c in configs}
        parts[name] = [d for d in dirs if os.path.dirname(d) in wanted and (seeds is None or seed_of[d] in seeds)]
    for name, part in parts.items():
        if part:
            write_all([runs[d] for d in part], os.path.join(out_dir, name))
            ok = sum(runs[d].status == "ok" for d in part)
            log(f"{name}: {ok}/{len(part)} runs finished -> {os.path.join(out_dir, name)}.md, .csv, plots")

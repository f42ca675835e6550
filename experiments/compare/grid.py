"""Launching a grid of configs x seeds through tools/train_net.py, ``jobs`` at a time, resumably:
a run whose result file exists is skipped, an interrupted one resumes from its last checkpoint, and
one that diverged (detectron2 stops it with a FloatingPointError) is a result, not retried.
Each run directory also gets the command's status and log (frn_det.engine.processes), which
:func:`experiments.compare.runs.load_run` reads to say why a run failed."""
import concurrent.futures
import os
import sys
import threading

from ..paths import REPO, TRAIN_NET

# frn_det.engine.results.RESULT_FILE, spelled out: planning a grid (a dry run, the skips) imports
# neither torch nor detectron2, so that it takes a moment (tests/test_compare_ap.py holds them equal).
RESULT_FILE = "frn_det_result.json"
# frn_det.engine.processes.LOG_FILE, likewise: the launch's log of each run
LOG_FILE = "compare_ap_train.log"
# detectron2's SimpleTrainer stops a run whose loss became infinite or NaN with this error
DIVERGED = "FloatingPointError"


def diverged(run_dir):
    """The line saying that the run's loss became infinite or NaN, if its log (the last 64 KiB) has it."""
    try:
        with open(os.path.join(run_dir, LOG_FILE), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 65536))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((ln.strip() for ln in reversed(tail) if ln.startswith(DIVERGED)), None)


def run_dir_for(root, config_file, seed):
    """output root / <config folder>_<config name> / seed<k>."""
    stem = os.path.splitext(os.path.basename(config_file))[0]
    fam = os.path.basename(os.path.dirname(os.path.abspath(config_file)))
    return os.path.join(root, f"{fam}_{stem}", f"seed{seed}")


def train_command(config_file, seed, run_dir, opts=(), train_net=TRAIN_NET, python=sys.executable):
    return [python, train_net, "--config-file", config_file, "--num-gpus", "1", "--resume",
            "SEED", str(seed), "OUTPUT_DIR", run_dir, *opts]


def launch_grid(configs, seeds, root, opts=(), train_net=TRAIN_NET, python=sys.executable,
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
        elif line := diverged(rdir):
            log(f"{tag}: diverged ({line}), not retried (remove {rdir} to run it again)")
        elif dry_run:
            log(f"{tag}: would run {' '.join(train_command(cfg, seed, rdir, opts, train_net, python))}")
        else:
            todo.append((tag, train_command(cfg, seed, rdir, opts, train_net, python), rdir))
    if not todo:
        return plan
    from frn_det.data import ensure_synthetic
    from frn_det.engine.config import load_cfg
    from frn_det.engine.processes import run_logged, thread_env

    datasets = set()  # generate a synthetic dataset once here, not in parallel runs
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
        rc, wall_s = run_logged(cmd, rdir, env, timeout, cwd=REPO)
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


def collect_grid(configs, seeds, root):
    """(runs, expected): every planned run of the grid, loaded, and the number of seeds each group expects."""
    from .runs import load_run

    runs = [load_run(run_dir_for(root, cfg, s), config_file=cfg, seed=s) for cfg in configs for s in seeds]
    return runs, {r.key(): len(seeds) for r in runs if r.key() is not None}

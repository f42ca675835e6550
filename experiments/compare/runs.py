"""Run directories and what became of them: the results contract (frn_det.engine.results) plus the
status a launch leaves (frn_det.engine.processes). A run is ok, failed or missing, with a reason;
groups are (family, norm [+ variant], images per GPU, GPUs), family being the config file's folder.
"""
import glob
import math
import os
import re

from detectron2.engine import DefaultTrainer

from frn_det.engine.config import load_cfg
from frn_det.engine.processes import LOG_FILE, read_status, tail_lines
from frn_det.engine.results import RESULT_FILE, read_result


_LR_TOKEN = re.compile(r"lr[0-9.e+-]+")  # a learning-rate sweep's tag in a config name: lr0.02


class Run:
    """One run directory and what became of it.

    status: "ok", "failed" or "missing"; reason: why, when not ok.
    """

    def __init__(self, run_dir, status, reason="", result=None, config_file=None, seed=None, variant=None):
        self.run_dir = run_dir
        self.status = status
        self.reason = reason
        self.result = result or {}
        self.config_file = self.result.get("config_file", config_file)
        self.seed = self.result.get("seed", seed)
        self._variant = variant

    def on_dataset(self, name, variant=None):
        """This run as one of its test datasets has it (that dataset's results and curve: the results
        contract's "by_dataset"), under the label ``variant`` when given (a sweep run that is also a
        grid cell); failed if the run finished without results for ``name``."""
        entry = self.result.get("by_dataset", {}).get(name)
        result = dict(self.result, **entry) if entry is not None else self.result
        status, reason = self.status, self.reason
        if status == "ok" and entry is None:
            status, reason = "failed", f"no results for test dataset {name}"
        return Run(self.run_dir, status, reason, result, self.config_file, self.seed,
                   self._variant if variant is None else variant)

    @property
    def family(self):
        cf = self.config_file
        return os.path.basename(os.path.dirname(cf)) if cf else "?"

    @property
    def variant(self):
        """What the config changes beyond norm and batch: the part of its name after ``<B>img_``
        (``FRN_2img_RELU.yaml`` -> "RELU", a learning-rate sweep's ``lr0.02``, both:
        ``centered_lr0.01``); "" for none."""
        if self._variant is not None:
            return self._variant
        stem = os.path.splitext(os.path.basename(self.config_file or ""))[0]
        return stem.split("img_", 1)[1] if "img_" in stem else ""

    @property
    def arm(self):
        """The variant without a learning-rate sweep's tag: ``centered_lr0.01`` -> "centered"."""
        return "_".join(t for t in self.variant.split("_") if t and not _LR_TOKEN.fullmatch(t))

    @property
    def is_sweep(self):
        """Whether the config is a learning-rate sweep's (its variant has an lr tag)."""
        return any(_LR_TOKEN.fullmatch(t) for t in self.variant.split("_"))

    def _described(self):
        return self.result if self.status == "ok" else (self.result or describe_config(self.config_file) or {})

    def key(self):
        """(family, norm [+ " " + variant], images per GPU, GPUs): from the result, else from the
        config (None if unknown)."""
        r = self._described()
        if r.get("norm") is None or r.get("images_per_gpu") is None:
            return None
        label = str(r["norm"]) + (f" {self.variant}" if self.variant else "")
        return (self.family, label, r["images_per_gpu"], r.get("num_gpus"))

    @property
    def images_seen(self):
        r = self._described()
        return r["max_iter"] * r["ims_per_batch"] if r.get("max_iter") and r.get("ims_per_batch") else None

    def curve(self, task="bbox"):
        """[(images seen, AP)] of the evaluations during training (results contract "curve")."""
        return [(c["images_seen"], c[task]) for c in self.result.get("curve", []) if c.get(task) is not None]

    def last_quarter_change(self, task="bbox"):
        """AP at the end minus AP at the last evaluation at or before 3/4 of training (None without one)."""
        curve, seen = self.curve(task), self.images_seen
        early = [ap for n, ap in curve if seen and n <= 0.75 * seen + 1e-9]
        return curve[-1][1] - early[-1] if curve and early and curve[-1][0] == seen else None

    @property
    def ims_per_batch(self):
        return self._described().get("ims_per_batch")

    def metric(self, task, name):
        v = self.result.get("results", {}).get(task, {}).get(name)
        return float(v) if v is not None else math.nan


_DESCRIBED = {}


def describe_config(config_file, num_gpus=1):
    """norm / images per GPU / batch a config trains with on `num_gpus` processes (the grid runs
    with --num-gpus 1), for runs that failed before writing their result; None if unreadable."""
    if not config_file or not os.path.isfile(config_file):
        return None
    if config_file not in _DESCRIBED:
        try:
            cfg = DefaultTrainer.auto_scale_workers(load_cfg(config_file, freeze=False), num_gpus)
            _DESCRIBED[config_file] = {"norm": cfg.MODEL.RESNETS.NORM, "num_gpus": num_gpus,
                                       "images_per_gpu": cfg.SOLVER.IMS_PER_BATCH // num_gpus,
                                       "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH, "max_iter": cfg.SOLVER.MAX_ITER,
                                       "base_lr": cfg.SOLVER.BASE_LR}
        except Exception:  # a config that does not load is reported through the run's reason
            _DESCRIBED[config_file] = None
    return _DESCRIBED[config_file]


def _failure_line(lines):
    """The most telling line of a failed run's log: the last error/exception line, else the last."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or "error:" in ln:
            return ln
    return lines[-1] if lines else ""


def find_runs(root):
    """{run directory: seed} of every ``root/<folder>_<config>/seed<k>`` (the grid launcher's layout:
    a stray seed0.bak or file is not a run), sorted."""
    found = {}
    for d in sorted(glob.glob(os.path.join(root, "*", "seed*"))):
        m = re.fullmatch(r"seed(\d+)", os.path.basename(d))
        if m and os.path.isdir(d):
            found[d] = int(m.group(1))
    return found


def load_run(run_dir, config_file=None, seed=None):
    """Read one run directory into a Run, deciding ok / failed / missing with a reason."""
    path = os.path.join(run_dir, RESULT_FILE)
    launched = read_status(run_dir)
    if launched is not None and config_file is None:
        cmd = launched.get("command") or []
        if "--config-file" in cmd[:-1]:
            config_file = cmd[cmd.index("--config-file") + 1]
        if "SEED" in cmd[:-1] and seed is None:
            seed = int(cmd[cmd.index("SEED") + 1])
    if not os.path.isfile(path):
        if launched is not None and launched.get("returncode") not in (None, 0):
            line = _failure_line(tail_lines(os.path.join(run_dir, LOG_FILE)))
            reason = f"train_net exited with {launched['returncode']}" + (f": {line}" if line else "")
            return Run(run_dir, "failed", reason, config_file=config_file, seed=seed)
        if launched is not None and launched.get("returncode") == 0:
            return Run(run_dir, "failed", f"train_net exited 0 but wrote no {RESULT_FILE}",
                       config_file=config_file, seed=seed)
        why = "no run directory" if not os.path.isdir(run_dir) else f"no {RESULT_FILE}"
        if launched is not None and launched.get("returncode") is None:
            why += " (launched, never finished: interrupted?)"
        return Run(run_dir, "missing", why, config_file=config_file, seed=seed)
    try:
        result = read_result(run_dir)
    except (OSError, ValueError) as e:
        return Run(run_dir, "failed", f"unreadable {RESULT_FILE}: {e}", config_file=config_file, seed=seed)
    run = Run(run_dir, "ok", result=result, config_file=config_file, seed=seed)
    bbox = result.get("results", {}).get("bbox")
    if not bbox:
        run.status, run.reason = "failed", "result has no bbox AP"
    elif math.isnan(run.metric("bbox", "AP")):
        run.status, run.reason = "failed", "bbox AP is NaN (the model made no predictions)"
    elif result.get("images_per_gpu") is None or result.get("norm") is None:
        run.status, run.reason = "failed", "result lacks norm / images_per_gpu"
    return run

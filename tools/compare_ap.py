#!/usr/bin/env python
"""Compare detection AP across norms and images per GPU.

Collect finished runs (directories holding the frn_det_result.json that tools/train_net.py
writes) into a markdown table, CSVs and a PNG plot of AP against images per GPU, one line per norm:

    python tools/compare_ap.py collect output/run_a output/run_b ... --out output/compare/ap

or launch a grid of configs x seeds through tools/train_net.py first (sequentially; resumable:
a run whose frn_det_result.json exists is skipped, an interrupted one resumes from its last
checkpoint), then collect it:

    python tools/compare_ap.py grid --configs configs/a.yaml configs/b.yaml --seeds 0 1 \
        --root output/grid --out output/grid/ap [--opts KEY VALUE ...]

Outputs (PREFIX from --out): PREFIX.md (table + missing/failed runs), PREFIX.csv (one row per
group: mean, std, min, max of every metric over seeds), PREFIX_runs.csv (one row per run, with its
status and reason) and PREFIX.png. Groups are (family, norm, images per GPU, GPUs), where family is
the name of the config file's folder. A run that is missing, failed (non-zero exit, no result
file) or produced no AP (NaN) is listed with its reason and not averaged in; the table says how
many of the expected runs each row averages.
"""

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import OrderedDict

RESULT_FILE = "frn_det_result.json"  # written by tools/train_net.py (docs/CONTRACTS.md)
STATUS_FILE = "compare_ap_status.json"  # written by this tool for the runs it launches
LOG_FILE = "compare_ap_train.log"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TASKS = ("bbox", "segm")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


class Run:
    """One run directory and what became of it.

    status: "ok", "failed" or "missing"; reason: why, when not ok.
    """

    def __init__(self, run_dir, status, reason="", result=None, config_file=None, seed=None):
        self.run_dir = run_dir
        self.status = status
        self.reason = reason
        self.result = result or {}
        self.config_file = self.result.get("config_file", config_file)
        self.seed = self.result.get("seed", seed)

    @property
    def family(self):
        cf = self.config_file
        return os.path.basename(os.path.dirname(cf)) if cf else "?"

    def key(self):
        """(family, norm, images per GPU, GPUs): from the result, else from the config (None if unknown)."""
        r = self.result if self.status == "ok" else (self.result or describe_config(self.config_file) or {})
        if r.get("norm") is None or r.get("images_per_gpu") is None:
            return None
        return (self.family, str(r["norm"]), r["images_per_gpu"], r.get("num_gpus"))

    @property
    def ims_per_batch(self):
        r = self.result if self.status == "ok" else (self.result or describe_config(self.config_file) or {})
        return r.get("ims_per_batch")

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
            sys.path.insert(0, REPO)
            import frn_det  # noqa: F401  (registers the norm name FRN)
            from detectron2.config import get_cfg
            from detectron2.engine import DefaultTrainer

            cfg = get_cfg()
            frn_det.add_frn_config(cfg)
            cfg.merge_from_file(config_file)
            cfg = DefaultTrainer.auto_scale_workers(cfg, num_gpus)
            _DESCRIBED[config_file] = {"norm": cfg.MODEL.RESNETS.NORM, "num_gpus": num_gpus,
                                       "images_per_gpu": cfg.SOLVER.IMS_PER_BATCH // num_gpus,
                                       "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH}
        except Exception:  # a config that does not load is reported through the run's reason
            _DESCRIBED[config_file] = None
    return _DESCRIBED[config_file]


def _tail(path, n=40):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def _failure_line(lines):
    """The most telling line of a failed run's log: the last error/exception line, else the last."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or "error:" in ln:
            return ln
    return lines[-1] if lines else ""


def load_run(run_dir, config_file=None, seed=None):
    """Read one run directory into a Run, deciding ok / failed / missing with a reason."""
    path = os.path.join(run_dir, RESULT_FILE)
    status_path = os.path.join(run_dir, STATUS_FILE)
    launched = None
    if os.path.isfile(status_path):
        try:
            with open(status_path) as f:
                launched = json.load(f)
        except (OSError, ValueError):
            launched = None
    if launched is not None and config_file is None:
        cmd = launched.get("command") or []
        if "--config-file" in cmd[:-1]:
            config_file = cmd[cmd.index("--config-file") + 1]
        if "SEED" in cmd[:-1] and seed is None:
            seed = int(cmd[cmd.index("SEED") + 1])
    if not os.path.isfile(path):
        if launched is not None and launched.get("returncode") not in (None, 0):
            line = _failure_line(_tail(os.path.join(run_dir, LOG_FILE)))
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
        with open(path) as f:
            result = json.load(f)
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


def _stats(values):
    """mean, std (sample, 0 for one value), min, max, n of the non-NaN values."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def _sort_key(key):
    fam, norm, ipg, gpus = key
    return (fam, norm, ipg if ipg is not None else -1, gpus if gpus is not None else -1)


def aggregate(runs):
    """Group the runs and average the ok ones.

    Returns an OrderedDict {(family, norm, images_per_gpu, num_gpus): group}, a group being
    {"runs": [Run], "ok": [Run], "tasks": [task], "seeds": [seed of ok runs],
     "stats": {(task, metric): _stats}}. Runs that failed before writing a result have no norm or
    images per GPU; they are grouped by what their config path says only in the failure list.
    """
    groups = {}
    for run in runs:
        key = run.key()
        if key is None:  # failed without a result and its config does not say: only listed
            continue
        g = groups.setdefault(key, {"runs": [], "ok": []})
        g["runs"].append(run)
        if run.status == "ok":
            g["ok"].append(run)
    out = OrderedDict()
    for key in sorted(groups, key=_sort_key):
        g = groups[key]
        tasks = [t for t in TASKS if any(t in r.result.get("results", {}) for r in g["ok"])]
        g["tasks"] = tasks
        g["seeds"] = sorted(r.seed for r in g["ok"] if r.seed is not None)
        g["stats"] = {(t, m): _stats([r.metric(t, m) for r in g["ok"]]) for t in tasks for m in METRICS}
        out[key] = g
    return out


def _fmt(x, nd=2):
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def write_csv(groups, path):
    cols = ["family", "norm", "images_per_gpu", "num_gpus", "ims_per_batch", "n_runs", "n_failed", "seeds"]
    for t in TASKS:
        for m in METRICS:
            cols += [f"{t}_{m}_{s}" for s in ("mean", "std", "min", "max")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for (fam, norm, ipg, gpus), g in groups.items():
            row = [fam, norm, ipg, gpus, g["runs"][0].ims_per_batch, len(g["ok"]),
                   len(g["runs"]) - len(g["ok"]), " ".join(str(s) for s in g["seeds"])]
            for t in TASKS:
                for m in METRICS:
                    st = g["stats"].get((t, m))
                    row += [""] * 4 if st is None else [_fmt(st[s], 4) for s in ("mean", "std", "min", "max")]
            w.writerow(row)


def write_runs_csv(runs, path):
    cols = ["run_dir", "status", "reason", "config_file", "seed", "norm", "images_per_gpu", "num_gpus",
            "ims_per_batch", "max_iter", "base_lr", "wall_time_s"]
    cols += [f"{t}_{m}" for t in TASKS for m in METRICS]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in runs:
            res = r.result
            row = [r.run_dir, r.status, r.reason, r.config_file or "", "" if r.seed is None else r.seed]
            row += [res.get(k, "") for k in ("norm", "images_per_gpu", "num_gpus", "ims_per_batch",
                                              "max_iter", "base_lr", "wall_time_s")]
            for t in TASKS:
                for m in METRICS:
                    v = r.metric(t, m)
                    row.append("" if t not in res.get("results", {}) else _fmt(v, 4))
            w.writerow(row)


def markdown(groups, runs, expected=None):
    """The table (mean ± std over seeds, min–max for AP) and the list of missing/failed runs."""
    lines = []
    tasks = [t for t in TASKS if any(t in g["tasks"] for g in groups.values())]
    head = ["family", "norm", "img/GPU", "GPUs", "batch", "runs"]
    for t in tasks:
        head += [f"{t} AP", f"{t} AP min–max"] + [f"{t} {m}" for m in METRICS[1:]]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for (fam, norm, ipg, gpus), g in groups.items():
        n_exp = expected.get((fam, norm, ipg, gpus)) if expected else len(g["runs"])
        n_runs = f"{len(g['ok'])}" + (f"/{n_exp}" if n_exp != len(g["ok"]) else "")
        row = [fam, norm, str(ipg), str(gpus), str(g["runs"][0].ims_per_batch or ""), n_runs]
        for t in tasks:
            if not g["ok"]:
                row += ["all failed"] + [""] * len(METRICS)
                continue
            if t not in g["tasks"]:
                row += [""] * (len(METRICS) + 1)
                continue
            ap = g["stats"][(t, "AP")]
            row.append(f"{_fmt(ap['mean'])} ± {_fmt(ap['std'])}")
            row.append(f"{_fmt(ap['min'])}–{_fmt(ap['max'])}")
            for m in METRICS[1:]:
                st = g["stats"][(t, m)]
                # n/a: undefined for every seed (e.g. APl when the test set has no large object)
                row.append("n/a" if st["n"] == 0 else f"{_fmt(st['mean'])} ± {_fmt(st['std'])}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Mean ± sample std over seeds (0 with one seed); APs are detectron2's percentages; "
                 "n/a: undefined in every run (COCO gives no APs/APm/APl without objects of that size).")
    bad = [r for r in runs if r.status != "ok"]
    lines.append("")
    if bad:
        lines.append(f"Missing or failed runs ({len(bad)} of {len(runs)}), not averaged in:")
        lines.append("")
        for r in bad:
            what = r.config_file or "?"
            seed = "" if r.seed is None else f" seed {r.seed}"
            lines.append(f"- {r.status}: `{r.run_dir}` ({what}{seed}): {r.reason}")
    else:
        lines.append(f"All {len(runs)} runs finished.")
    return "\n".join(lines) + "\n"


def plot(groups, path, task="bbox", metric="AP"):
    """AP against images per GPU, one line per norm (error bars: std over seeds), one panel per
    family. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted({k[0] for k in groups})  # families with at least a run
    fig, axes = plt.subplots(1, max(1, len(fams)), figsize=(5.5 * max(1, len(fams)), 4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        norms = sorted({k[1] for k in groups if k[0] == fam})
        colors = {}
        for norm in norms:
            pts = sorted(((k[2], g) for k, g in groups.items() if k[0] == fam and k[1] == norm
                          and (task, metric) in g["stats"]), key=lambda p: p[0])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1]["stats"][(task, metric)]["mean"] for p in pts]
            es = [p[1]["stats"][(task, metric)]["std"] for p in pts]
            line = ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=norm)
            colors[norm] = line[0].get_color()
        failed = [(k, g) for k, g in groups.items() if k[0] == fam and not g["ok"]]
        for i, (k, g) in enumerate(sorted(failed, key=lambda kg: _sort_key(kg[0]))):
            ax.plot([k[2]], [0], marker="x", color=colors.get(k[1], "k"), markersize=9, clip_on=False,
                    linestyle="none", label="all runs failed" if i == 0 else None)
            ax.annotate(f"{k[1]} failed", (k[2], 0), textcoords="offset points", xytext=(4, 4 + 10 * i), fontsize=8)
        ax.set_xscale("log", base=2)
        xs_all = sorted({k[2] for k in groups if k[0] == fam and k[2] is not None})
        ax.set_xticks(xs_all)
        ax.set_xticklabels([str(x) for x in xs_all])
        ax.set_xlabel("images per GPU")
        ax.set_ylabel(f"{task} {metric}")
        seeds = sorted({len(g["ok"]) for k, g in groups.items() if k[0] == fam and g["ok"]})
        n = "/".join(str(x) for x in seeds)
        ax.set_title(f"{fam}: mean ± std over {n} seed{'s' if seeds != [1] else ''}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(title="norm")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_all(runs, out_prefix, expected=None):
    """Write PREFIX.md, PREFIX.csv, PREFIX_runs.csv and PREFIX.png; return the groups."""
    d = os.path.dirname(out_prefix)
    if d:
        os.makedirs(d, exist_ok=True)
    groups = aggregate(runs)
    with open(out_prefix + ".md", "w") as f:
        f.write(markdown(groups, runs, expected))
    write_csv(groups, out_prefix + ".csv")
    write_runs_csv(runs, out_prefix + "_runs.csv")
    if groups:
        plot(groups, out_prefix + ".png")
    return groups


# ---------------------------------------------------------------- grid launching
def run_dir_for(root, config_file, seed):
    """output root / <config folder>_<config name> / seed<k>."""
    stem = os.path.splitext(os.path.basename(config_file))[0]
    fam = os.path.basename(os.path.dirname(os.path.abspath(config_file)))
    return os.path.join(root, f"{fam}_{stem}", f"seed{seed}")


def train_command(config_file, seed, run_dir, opts=(), train_net=DEFAULT_TRAIN_NET, python=sys.executable):
    return [python, train_net, "--config-file", config_file, "--num-gpus", "1", "--resume",
            "SEED", str(seed), "OUTPUT_DIR", run_dir, *opts]


def launch_grid(configs, seeds, root, opts=(), train_net=DEFAULT_TRAIN_NET, python=sys.executable,
                dry_run=False, timeout=None, log=print):
    """Run every (config, seed) not finished yet, one after the other. Returns [(config, seed, dir)]."""
    # seed-major: an interrupted grid has whole sweeps rather than some configs with every seed
    plan = [(c, s, run_dir_for(root, c, s)) for s in seeds for c in configs]
    for i, (cfg, seed, rdir) in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)}] {cfg} seed {seed}"
        if os.path.isfile(os.path.join(rdir, RESULT_FILE)):
            log(f"{tag}: done already, skipped")
            continue
        cmd = train_command(cfg, seed, rdir, opts, train_net, python)
        if dry_run:
            log(f"{tag}: would run {' '.join(cmd)}")
            continue
        os.makedirs(rdir, exist_ok=True)
        status = {"command": cmd, "returncode": None, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        _write_json(os.path.join(rdir, STATUS_FILE), status)
        log(f"{tag}: running -> {rdir}")
        t0 = time.time()
        with open(os.path.join(rdir, LOG_FILE), "a") as logf:
            try:
                rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
                logf.write(f"\nError: killed by compare_ap after {timeout} s\n")
        status.update(returncode=rc, wall_s=round(time.time() - t0, 1))
        _write_json(os.path.join(rdir, STATUS_FILE), status)
        log(f"{tag}: exit {rc} after {status['wall_s']} s")
    return plan


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("collect", help="collect existing run directories")
    c.add_argument("run_dirs", nargs="+")
    g = sub.add_parser("grid", help="launch configs x seeds through train_net (resumable), then collect")
    g.add_argument("--configs", nargs="+", required=True)
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    g.add_argument("--root", required=True, help="runs go to ROOT/<folder>_<config>/seed<k>")
    g.add_argument("--train-net", default=DEFAULT_TRAIN_NET)
    g.add_argument("--timeout", type=float, default=None, help="seconds per run (default: none)")
    g.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    g.add_argument("--no-launch", action="store_true", help="only collect what the grid has so far")
    g.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE config overrides passed to every run (last argument)")
    for p in (c, g):
        p.add_argument("--out", required=True, help="output prefix: PREFIX.md/.csv/_runs.csv/.png")
    args = ap.parse_args(argv)

    expected = None
    if args.mode == "collect":
        runs = [load_run(d) for d in args.run_dirs]
    else:
        if not args.no_launch:
            launch_grid(args.configs, args.seeds, args.root, args.opts, args.train_net,
                        dry_run=args.dry_run, timeout=args.timeout)
        if args.dry_run:
            return 0
        runs = [load_run(run_dir_for(args.root, cfg, s), config_file=cfg, seed=s)
                for cfg in args.configs for s in args.seeds]
        expected = {r.key(): len(args.seeds) for r in runs if r.key() is not None}
    write_all(runs, args.out, expected)
    n_bad = sum(r.status != "ok" for r in runs)
    print(f"{len(runs) - n_bad}/{len(runs)} runs ok; wrote {args.out}.md, .csv, _runs.csv, .png")
    if n_bad:
        print(f"{n_bad} missing or failed: see {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Comparison of runs across norms and images per GPU: collection of run directories (the results
contract, frn_det.engine.results, plus the status a grid launch leaves), aggregation over seeds,
markdown and CSV tables, and the plot of AP against images per GPU.

A run that is missing, failed (non-zero exit, no result file) or produced no AP (NaN) is listed
with its reason and not averaged in. Groups are (family, norm, images per GPU, GPUs), where family
is the name of the config file's folder.
"""
import csv
import json
import math
import os
import statistics
from collections import OrderedDict

from detectron2.engine import DefaultTrainer

from .config import load_cfg
from .results import COCO_METRICS as METRICS
from .results import RESULT_FILE, TASKS, read_result

STATUS_FILE = "compare_ap_status.json"  # written by frn_det.engine.grid for the runs it launches
LOG_FILE = "compare_ap_train.log"


def read_status(run_dir):
    """The launch status a grid left in ``run_dir`` ({"command", "returncode", ...}); None if none."""
    try:
        with open(os.path.join(run_dir, STATUS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


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

    @property
    def variant(self):
        """What the config changes beyond norm and batch: the part of its name after ``<B>img_``
        (``FRN_2img_RELU.yaml`` -> "RELU", a learning-rate sweep's ``lr0.02``); "" for none."""
        stem = os.path.splitext(os.path.basename(self.config_file or ""))[0]
        return stem.split("img_", 1)[1] if "img_" in stem else ""

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


def tail_lines(path, n=40):
    """The last ``n`` lines of a text file (none when it cannot be read)."""
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


RUN_COLUMNS = ("family", "norm", "variant", "images_per_batch", "seed", "base_lr", "images_seen", "AP", "AP50",
               "AP75", "mask_AP", "AP_change_last_quarter", "status", "reason", "run_dir")


def run_rows(runs):
    """One dict per run with RUN_COLUMNS (box AP; mask_AP where the model predicts masks)."""
    rows = []
    for r in runs:
        d = r._described()
        segm = r.result.get("results", {}).get("segm")
        change = r.last_quarter_change()
        rows.append({
            "family": r.family, "norm": d.get("norm", ""), "variant": r.variant,
            "images_per_batch": d.get("ims_per_batch", ""), "seed": "" if r.seed is None else r.seed,
            "base_lr": d.get("base_lr", ""), "images_seen": r.images_seen or "",
            "AP": _fmt(r.metric("bbox", "AP"), 2) if r.status == "ok" else "",
            "AP50": _fmt(r.metric("bbox", "AP50"), 2) if r.status == "ok" else "",
            "AP75": _fmt(r.metric("bbox", "AP75"), 2) if r.status == "ok" else "",
            "mask_AP": _fmt(r.metric("segm", "AP"), 2) if segm else "",
            "AP_change_last_quarter": "" if change is None else _fmt(change, 2),
            "status": r.status, "reason": r.reason, "run_dir": r.run_dir,
        })
    return rows


def write_runs_csv(runs, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_COLUMNS)
        w.writeheader()
        w.writerows(run_rows(runs))


def paired_differences(runs, a="FRN", b="GN", task="bbox"):
    """{(family, images per GPU): {"seeds": [...], "diffs": [...], "stats": _stats}} of AP(a) - AP(b)
    over the seeds where both base-variant runs finished (same seed: same initialisation and data order)."""
    by = {}
    for r in runs:
        if r.status == "ok" and not r.variant:
            by[(r.family, r.result["images_per_gpu"], r.result["norm"], r.seed)] = r.metric(task, "AP")
    out = OrderedDict()
    for fam, ipg in sorted({(k[0], k[1]) for k in by}):
        seeds = sorted(s for (f, i, n, s) in by if (f, i, n) == (fam, ipg, a) and (fam, ipg, b, s) in by)
        if seeds:
            diffs = [by[(fam, ipg, a, s)] - by[(fam, ipg, b, s)] for s in seeds]
            out[(fam, ipg)] = {"seeds": seeds, "diffs": diffs, "stats": _stats(diffs)}
    return out


def lr_sweep(runs, task="bbox"):
    """{(norm, batch): [(base_lr, mean AP, n runs)]}: runs of one family, norm, batch size and schedule
    that differ only in their learning rate. Those whose variant is a learning rate (``lr<value>``),
    and the plain run of the same settings (the grid's cell, at the linear rule's rate) for the seeds
    the sweep ran. One sweep per norm and batch size, since base_lr is per batch."""
    done = [r for r in runs if r.status == "ok"]

    def settings(r):
        return r.family, r.result["norm"], r.ims_per_batch, r.images_seen

    swept = {}
    for r in done:
        if r.variant.startswith("lr"):
            swept.setdefault(settings(r), set()).add(r.seed)
    points = {}
    for r in done:
        if r.variant.startswith("lr") or (r.variant == "" and r.seed in swept.get(settings(r), ())):
            points.setdefault((r.result["norm"], r.ims_per_batch, r.result["base_lr"]), []).append(r.metric(task, "AP"))
    out = {}
    for (norm, batch, lr), aps in sorted(points.items()):
        out.setdefault((norm, batch), []).append((lr, statistics.fmean(aps), len(aps)))
    return out


def _none_ok_label(runs):
    """What a group without a finished run says in the table: failed runs are a result (BN at batch
    1 may fail), runs still training or interrupted are not."""
    statuses = {r.status for r in runs}
    return {frozenset({"failed"}): "all failed", frozenset({"missing"}): "not finished"}.get(
        frozenset(statuses), "failed or not finished")


def markdown(groups, runs, expected=None):
    """The table (mean ± std over seeds, min–max for AP) and the list of missing/failed runs."""
    lines = []
    # the box AP column exists even before any run has finished
    tasks = [t for t in TASKS if any(t in g["tasks"] for g in groups.values())] or TASKS[:1]
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
                row += [_none_ok_label(g["runs"])] + [""] * len(METRICS)
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
    for other in ("GN", "BN"):
        pairs = paired_differences(runs, "FRN", other)
        if pairs:
            lines += ["", f"Paired differences FRN - {other} (box AP, same seed = same initialisation and data order):", "",
                      "| family | img/GPU | seeds | per seed | mean ± std |", "|---|---|---|---|---|"]
            for (fam, ipg), p in pairs.items():
                per = ", ".join(f"{d:+.2f}" for d in p["diffs"])
                lines.append(f"| {fam} | {ipg} | {' '.join(map(str, p['seeds']))} | {per} | "
                             f"{p['stats']['mean']:+.2f} ± {_fmt(p['stats']['std'])} |")
    sweep = lr_sweep(runs)
    if sweep:
        lines += ["", "Learning-rate sweep (box AP; mean over the seeds run):", "", "| norm | base_lr: AP |",
                  "|---|---|"]
        for (norm, batch), pts in sweep.items():
            lines.append(f"| {norm} batch {batch} | " + ", ".join(f"{lr:g}: {ap:.2f}" + (f" ({n} seeds)" if n > 1 else "")
                                                     for lr, ap, n in pts) + " |")
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


_NORM_COLORS = {"BN": "tab:blue", "SyncBN": "tab:purple", "GN": "tab:orange", "FRN": "tab:green"}
_VARIANT_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (3, 1, 1, 1, 1, 1)), "v"))  # line, marker


def _norm_color(label):
    """One colour per norm in every plot, so BN, GN and FRN read the same across figures; ``label`` is
    a norm or a group's "norm variant"."""
    return _NORM_COLORS.get(label.split()[0], "tab:gray")


def plot(groups, path, task="bbox", metric="AP"):
    """AP against images per GPU, one line per norm (error bars: std over seeds; variants only where
    a family has no plain-norm runs), one panel per family. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted({k[0] for k in groups})  # families with at least a run
    fig, axes = plt.subplots(1, max(1, len(fams)), figsize=(5.5 * max(1, len(fams)), 4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        labels = sorted({k[1] for k in groups if k[0] == fam})
        # the base norms only, when there are any: sweeps and ablations have their own plots
        norms = [n for n in labels if " " not in n] or labels
        for norm in norms:
            pts = sorted(((k[2], g) for k, g in groups.items() if k[0] == fam and k[1] == norm
                          and (task, metric) in g["stats"]), key=lambda p: p[0])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1]["stats"][(task, metric)]["mean"] for p in pts]
            es = [p[1]["stats"][(task, metric)]["std"] for p in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=norm, color=_norm_color(norm))
        # a cell whose runs all failed is a result (BN at batch 1 may fail); one still training is not
        failed = [(k, g) for k, g in groups.items() if k[0] == fam and k[1] in norms
                  and _none_ok_label(g["runs"]) == "all failed"]
        for i, (k, g) in enumerate(sorted(failed, key=lambda kg: _sort_key(kg[0]))):
            ax.plot([k[2]], [0], marker="x", color=_norm_color(k[1]), markersize=9, clip_on=False,
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


def plot_curves(runs, path, task="bbox"):
    """AP against images seen during training, one panel per (family, images per GPU), one line per
    norm (colour) and variant (line style): the mean over seeds at each evaluation, shaded between
    min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {}
    for r in runs:
        if r.status == "ok" and r.curve(task):
            label = (r.result["norm"], r.variant)
            cells.setdefault((r.family, r.result["images_per_gpu"]), {}).setdefault(label, []).append(r.curve(task))
    if not cells:
        return None
    keys = sorted(cells)
    many = max(len(cells[k]) for k in keys) > 4  # legends that would hide the lines go beside each panel
    fig, axes = plt.subplots(1, len(keys), figsize=((6.4 if many else 4.2) * len(keys), 3.6), squeeze=False, sharey=True)
    variants = sorted({v for cell in cells.values() for _, v in cell})
    style = {v: _VARIANT_STYLES[i % len(_VARIANT_STYLES)] for i, v in enumerate(variants)}
    for ax, key in zip(axes[0], keys):
        for (norm, variant), curves in sorted(cells[key].items()):
            n = min(len(c) for c in curves)
            xs = [curves[0][i][0] for i in range(n)]
            vals = [[c[i][1] for c in curves] for i in range(n)]
            seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
            line, marker = style[variant]
            ax.plot(xs, [statistics.fmean(v) for v in vals], marker=marker, markersize=3, color=_norm_color(norm),
                    linestyle=line, label=f"{norm} {variant} ({seeds})".replace("  ", " "))
            ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=_norm_color(norm), alpha=0.15)
        ax.set_title(f"{key[0]}, {key[1]} img/batch", fontsize=9)
        ax.set_xlabel("images seen")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7 if many else 8, **({"loc": "upper left", "bbox_to_anchor": (1.0, 1.0)} if many else {}))
    axes[0][0].set_ylabel(f"{task} AP")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_lr_sweep(runs, path, task="bbox"):
    """Final AP against the base learning rate (log scale), one line per norm and batch size."""
    sweep = lr_sweep(runs, task)
    if not sweep:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    batches = sorted({batch for _, batch in sweep})
    for (norm, batch), pts in sweep.items():
        # one colour per norm, a line style per batch size
        style = ("-", "--", ":")[min(batches.index(batch), 2)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{norm} batch {batch}",
                color=_norm_color(norm))
    ax.set_xscale("log")
    lrs = sorted({p[0] for pts in sweep.values() for p in pts})
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("base learning rate (per batch)")
    ax.set_ylabel(f"final {task} AP")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_all(runs, out_prefix, expected=None):
    """Write PREFIX.md, PREFIX.csv (one row per run: RUN_COLUMNS), PREFIX_groups.csv (one row per
    group: statistics over seeds), PREFIX.png, and PREFIX_curves.png / PREFIX_lr_sweep.png where the
    runs have curves / a sweep; return the groups."""
    d = os.path.dirname(out_prefix)
    if d:
        os.makedirs(d, exist_ok=True)
    groups = aggregate(runs)
    with open(out_prefix + ".md", "w") as f:
        f.write(markdown(groups, runs, expected))
    write_runs_csv(runs, out_prefix + ".csv")
    write_csv(groups, out_prefix + "_groups.csv")
    if groups:
        plot(groups, out_prefix + ".png")
    plot_curves(runs, out_prefix + "_curves.png")
    plot_lr_sweep(runs, out_prefix + "_lr_sweep.png")
    return groups



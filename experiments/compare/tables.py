"""Tables of a comparison: markdown (groups, paired differences, sweeps, missing and failed runs),
a CSV row per run and a CSV row per group."""
import csv
import math

from frn_det.engine.results import COCO_METRICS as METRICS
from frn_det.engine.results import TASKS

from .stats import lr_sweep, none_ok_label, paired_comparisons


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
                row += [none_ok_label(g["runs"])] + [""] * len(METRICS)
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
    for a, b, pairs in paired_comparisons(runs):
        lines += ["", f"Paired differences {a} - {b} (box AP, same seed = same initialisation and data order):", "",
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

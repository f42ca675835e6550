"""Statistics over runs: groups averaged over seeds, paired differences between norms (same seed =
same initialisation and data order) and learning-rate sweeps."""
import math
import statistics
from collections import OrderedDict

from frn_det.engine.results import COCO_METRICS as METRICS
from frn_det.engine.results import TASKS


def summary(values):
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


def group_order(key):
    fam, norm, ipg, gpus = key
    return (fam, norm, ipg if ipg is not None else -1, gpus if gpus is not None else -1)


def aggregate(runs):
    """Group the runs and average the ok ones.

    Returns an OrderedDict {(family, norm, images_per_gpu, num_gpus): group}, a group being
    {"runs": [Run], "ok": [Run], "tasks": [task], "seeds": [seed of ok runs],
     "stats": {(task, metric): summary}}. Runs that failed before writing a result have no norm or
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
    for key in sorted(groups, key=group_order):
        g = groups[key]
        tasks = [t for t in TASKS if any(t in r.result.get("results", {}) for r in g["ok"])]
        g["tasks"] = tasks
        g["seeds"] = sorted(r.seed for r in g["ok"] if r.seed is not None)
        g["stats"] = {(t, m): summary([r.metric(t, m) for r in g["ok"]]) for t in tasks for m in METRICS}
        out[key] = g
    return out


def paired_differences(runs, a="FRN", b="GN", task="bbox"):
    """{(family, images per GPU): {"seeds": [...], "diffs": [...], "stats": summary}} of AP(a) - AP(b)
    over the seeds where both finished (same seed: same initialisation and data order); ``a`` and
    ``b`` are group labels: a norm ("FRN": its base runs) or a norm and variant ("FRN centered")."""
    by = {}
    for r in runs:
        if r.status == "ok":
            by[(r.family, r.result["images_per_gpu"], r.key()[1], r.seed)] = r.metric(task, "AP")
    out = OrderedDict()
    for fam, ipg in sorted({(k[0], k[1]) for k in by}):
        seeds = sorted(s for (f, i, n, s) in by if (f, i, n) == (fam, ipg, a) and (fam, ipg, b, s) in by)
        if seeds:
            diffs = [by[(fam, ipg, a, s)] - by[(fam, ipg, b, s)] for s in seeds]
            out[(fam, ipg)] = {"seeds": seeds, "diffs": diffs, "stats": summary(diffs)}
    return out


def paired_comparisons(runs, task="bbox"):
    """[(a, b, paired_differences(runs, a, b))] with pairs: FRN against GN and BN, then every variant
    but a learning-rate sweep's against FRN and GN (a study arm against the runs it is paired with)."""
    variants = sorted({r.key()[1] for r in runs if r.status == "ok" and r.variant and not r.is_sweep})
    wanted = [("FRN", "GN"), ("FRN", "BN")] + [(v, base) for v in variants for base in ("FRN", "GN")]
    found = [(a, b, paired_differences(runs, a, b, task)) for a, b in wanted]
    return [(a, b, pairs) for a, b, pairs in found if pairs]


def lr_sweep(runs, task="bbox"):
    """{(norm [+ arm], batch): [(base_lr, mean AP, n runs)]}: runs of one family, norm and arm (the
    variant without its lr tag, e.g. "centered"), batch size and schedule that differ only in their
    learning rate. Those whose variant has a learning rate (``lr<value>``), and the run of the same
    settings without one (the grid's cell, at the linear rule's rate) for the seeds the sweep ran.
    One sweep per norm, arm and batch size, since base_lr is per batch."""
    done = [r for r in runs if r.status == "ok"]

    def label(r):
        return r.result["norm"] + (f" {r.arm}" if r.arm else "")

    def settings(r):
        return r.family, label(r), r.ims_per_batch, r.images_seen

    swept = {}
    for r in done:
        if r.is_sweep:
            swept.setdefault(settings(r), set()).add(r.seed)
    points = {}
    for r in done:
        if r.is_sweep or r.seed in swept.get(settings(r), ()):
            points.setdefault((label(r), r.ims_per_batch, r.result["base_lr"]), []).append(r.metric(task, "AP"))
    out = {}
    for (norm, batch, lr), aps in sorted(points.items()):
        out.setdefault((norm, batch), []).append((lr, statistics.fmean(aps), len(aps)))
    return out


def none_ok_label(runs):
    """What a group without a finished run says in the table: failed runs are a result (BN at batch
    1 may fail), runs still training or interrupted are not."""
    statuses = {r.status for r in runs}
    return {frozenset({"failed"}): "all failed", frozenset({"missing"}): "not finished"}.get(
        frozenset(statuses), "failed or not finished")

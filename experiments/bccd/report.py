"""The BCCD comparison's report (docs/results/bccd*): the sweep and every learning curve on bccd_val
(where choices are made), the grid, the study arms and per-class AP on bccd_test, and the noise and
verdicts of plan.md's decision rule (paired bootstrap over the test images, spread over seeds).

Each finished run's test detections are kept beside its result (``bccd_test_detections.json.gz``,
committed like the result), so that a fresh clone recomputes the bootstrap."""
import gzip
import json
import math
import os
import shutil
import statistics
import tempfile

import numpy as np

from ..compare.bootstrap import ImageWeightedAP, resample_weights
from ..compare.grid import run_dir_for
from ..compare.report import write_all
from ..compare.runs import find_runs, load_run
from .configs import FAMILY, GRID_DIR, TWO_STAGE, cell_config, settings, study_configs, sweep_configs

VAL, TEST = "bccd_val", "bccd_test"
DETECTIONS = f"{TEST}_detections.json.gz"
PAIRS = (("FRN centered", "GN"), ("FRN centered", "FRN"), ("FRN", "GN"), ("FRN", "BN"))
N_RESAMPLES = 2000
CLASSES = ("RBC", "WBC", "Platelets")


def keep_test_detections(run_dir):
    """Compress the run's final test detections (COCOEvaluator's inference/bccd_test/
    coco_instances_results.json) into DETECTIONS; returns its path, None when there is neither."""
    dest = os.path.join(run_dir, DETECTIONS)
    src = os.path.join(run_dir, "inference", TEST, "coco_instances_results.json")
    if not os.path.isfile(dest) and os.path.isfile(src) and os.path.isfile(os.path.join(run_dir, "frn_det_result.json")):
        with open(src, "rb") as f, gzip.open(dest + ".tmp", "wb") as g:
            shutil.copyfileobj(f, g)
        os.replace(dest + ".tmp", dest)
    return dest if os.path.isfile(dest) else None


def _variant(arm):
    """The variant a cell of ``arm`` is labelled with: its group is the arm ("FRN centered" is the
    variant, never "FRN"), whether its run is a sweep's or the grid's own."""
    return settings()["arms"][arm].get("variant", "")


def _dir(root, rel):
    return os.path.dirname(run_dir_for(root, os.path.join(GRID_DIR, rel), 0))


def selections(root, runs):
    """{part: [Run views]}: "sweep" (val, seed 0), "grid" and "study" (test; a batch-2 cell is its
    arm's best sweep run, labelled as the arm), "grid_val" (the grid's runs on val, for the curves)."""
    by_dir = {}
    for d, run in runs.items():
        by_dir.setdefault(os.path.dirname(d), []).append(run)
    out = {"sweep": [], "grid": [], "grid_val": [], "study": []}
    for arm, configs in sweep_configs().items():
        for rel, _ in configs:
            out["sweep"] += [r.on_dataset(VAL) for r in by_dir.get(_dir(root, rel), []) if r.seed == 0]
    s = settings()
    cells = [(arm, batch, FAMILY) for arm in s["arms"] for batch in s["batches"] + [s["large_batch"]]]
    cells += [(arm, s["sweep_batch"], TWO_STAGE) for arm in s["two_stage_arms"]]
    for arm, batch, family in cells:
        rel = cell_config(arm, batch, family)
        if rel is not None:
            cell = by_dir.get(_dir(root, rel), [])
            out["grid"] += [r.on_dataset(TEST, _variant(arm)) for r in cell]
            out["grid_val"] += [r.on_dataset(VAL, _variant(arm)) for r in cell]
            if (batch, family) == (s["sweep_batch"], FAMILY) and arm in ("FRN", "GN"):
                out["study"] += [r.on_dataset(TEST, _variant(arm)) for r in cell]
    for rel, _, _ in study_configs():
        out["study"] += [r.on_dataset(TEST) for r in by_dir.get(_dir(root, rel), [])]
    return out


def _group_label(run):
    return run.key()[1] if run.key() else None


class TestNoise:
    """The bootstrap over the 72 test images of every grid/study run with kept detections."""

    def __init__(self, runs):
        from detectron2.data import MetadataCatalog

        from frn_det.data import ensure_coco_json
        from frn_det.engine.coco_eval import load_ground_truth

        ensure_coco_json(TEST)
        self.gt_file = MetadataCatalog.get(TEST).json_file
        self.gt = load_ground_truth(self.gt_file)
        self.weights = resample_weights(len(self.gt.getImgIds()), N_RESAMPLES, seed=0)
        self._ap = {}
        for r in runs:
            path = os.path.join(r.run_dir, DETECTIONS)
            if r.status == "ok" and os.path.isfile(path):
                with tempfile.NamedTemporaryFile("wb", suffix=".json") as tmp, gzip.open(path, "rb") as g:
                    shutil.copyfileobj(g, tmp)
                    tmp.flush()
                    model = ImageWeightedAP(self.gt, tmp.name)
                self._ap[r.run_dir] = (model(np.ones((1, len(model.image_ids))))[0], model(self.weights))

    def observed(self, run):
        return self._ap[run.run_dir][0] if run.run_dir in self._ap else math.nan

    def std(self, run):
        return float(np.std(self._ap[run.run_dir][1], ddof=1)) if run.run_dir in self._ap else math.nan

    def diff_std(self, a, b):
        if a.run_dir not in self._ap or b.run_dir not in self._ap:
            return math.nan
        return float(np.std(self._ap[a.run_dir][1] - self._ap[b.run_dir][1], ddof=1))


def verdict(diffs, n_img):
    """plan.md's rule: (mean, N_seed, SE, reading) of a paired difference with per-seed values
    ``diffs`` and test-image noise ``n_img``."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    n_seed = statistics.stdev(diffs) if n > 1 else math.nan
    se = math.sqrt(n_seed ** 2 / n + n_img ** 2) if n > 1 else math.nan
    if n < 2 or math.isnan(se):
        return mean, n_seed, se, f"needs seed {n}"
    if abs(mean) >= 2 * se:
        return mean, n_seed, se, "ahead" if mean > 0 else "behind"
    return mean, n_seed, se, "tie" if n >= 3 else f"needs seed {n}"


def pair_rows(grid_runs, noise):
    """Per detector (family), batch and pair of PAIRS: per-seed differences, their noise and the rule's reading."""
    cells = {}
    for r in grid_runs:
        if r.status == "ok":
            cells.setdefault((r.family, r.result["images_per_gpu"], _group_label(r)), {})[r.seed] = r
    rows = []
    for family, batch in sorted({(f, b) for f, b, _ in cells}):
        for a, b in PAIRS:
            ra, rb = cells.get((family, batch, a), {}), cells.get((family, batch, b), {})
            seeds = sorted(set(ra) & set(rb))
            if not seeds:
                continue
            diffs = [ra[s].metric("bbox", "AP") - rb[s].metric("bbox", "AP") for s in seeds]
            n_img = statistics.fmean([noise.diff_std(ra[s], rb[s]) for s in seeds])
            mean, n_seed, se, reading = verdict(diffs, n_img)
            rows.append({"family": family, "batch": batch, "a": a, "b": b, "seeds": seeds, "diffs": diffs, "mean": mean,
                         "N_img": n_img, "N_seed": n_seed, "SE": se, "reading": reading})
    return rows


def _f(x, nd=1, sign=False):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}")


def noise_markdown(grid_runs, study_runs, noise):
    """The grid's verdicts, and every test run's AP with its bootstrap std and per-class AP."""
    lines = ["# BCCD: noise and the decision rule (bccd_test)", "",
             "Paired differences of box AP on bccd_test (A - B, same seed); N_img: std of the difference under "
             f"a paired bootstrap over the {len(noise.gt.getImgIds())} test images ({N_RESAMPLES} resamples, the "
             "same for every run; mean over seeds); N_seed: std of the per-seed differences; SE = sqrt(N_seed^2 / n "
             "+ N_img^2); reading: |mean| >= 2 SE ahead / behind, else a tie with 3 seeds, else another seed "
             "(experiments/bccd/plan.md).", "",
             "| detector | batch | A - B | seeds | per seed | mean | N_img | N_seed | SE | reading |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in pair_rows(grid_runs, noise):
        lines.append(f"| {p['family']} | {p['batch']} | {p['a']} - {p['b']} | {' '.join(map(str, p['seeds']))} | "
                     f"{' / '.join(_f(d, sign=True) for d in p['diffs'])} | {_f(p['mean'], sign=True)} | {_f(p['N_img'])} | "
                     f"{_f(p['N_seed'])} | {_f(p['SE'])} | {p['reading']} |")
    lines += ["", "Every run on bccd_test: box AP, its bootstrap std over the test images, per-class AP:", "",
              "| run | detector | batch | seed | AP | bootstrap std | " + " | ".join(f"AP {c}" for c in CLASSES) + " | val AP | train+eval s |",
              "|---" * (8 + len(CLASSES)) + "|"]
    seen = set()
    for r in sorted(grid_runs + study_runs, key=lambda r: (r.family, _group_label(r) or "", r.ims_per_batch or 0,
                                                           r.seed or 0)):
        if r.status != "ok" or r.run_dir in seen:
            continue
        seen.add(r.run_dir)
        val = r.result.get("by_dataset", {}).get(VAL, {}).get("results", {}).get("bbox", {}).get("AP")
        lines.append(f"| {_group_label(r)} | {r.family} | {r.ims_per_batch} | {r.seed} | {_f(r.metric('bbox', 'AP'))} | "
                     f"{_f(noise.std(r))} | " + " | ".join(_f(r.metric("bbox", f"AP-{c}")) for c in CLASSES)
                     + f" | {_f(val)} | {r.result.get('wall_time_s', '')} |")
    return "\n".join(lines) + "\n"


def errors_markdown(grid_runs, noise):
    """tools/coco_eval.py --errors of each grid cell's seed-0 run on bccd_test: class confusion and AP
    by object size within each class."""
    from frn_det.engine.coco_eval import error_analysis, format_ap_by_class_size, format_confusion

    lines = ["# BCCD: where each norm loses (bccd_test, seed 0, `tools/coco_eval.py --errors`)", ""]
    for r in sorted(grid_runs, key=lambda r: (r.family, r.ims_per_batch or 0, _group_label(r) or "")):
        path = os.path.join(r.run_dir, DETECTIONS)
        if r.status != "ok" or r.seed != 0 or not os.path.isfile(path):
            continue
        with tempfile.NamedTemporaryFile("wb", suffix=".json") as tmp, gzip.open(path, "rb") as g:
            shutil.copyfileobj(g, tmp)
            tmp.flush()
            a = error_analysis(noise.gt_file, tmp.name)
        lines += [f"## {_group_label(r)}, {r.family}, batch {r.ims_per_batch}: AP {a['AP']:.1f}, class-agnostic AP "
                  f"{a['class_agnostic_AP']:.1f}", "", format_confusion(a), "", format_ap_by_class_size(a), ""]
    return "\n".join(lines)


def needing_seed(out_dir, seed):
    """Config paths of the grid cells whose pairs the rule leaves open with ``seed`` seeds (bccd_pairs.json)."""
    path = os.path.join(out_dir, "bccd_pairs.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        open_pairs = [p for p in json.load(f) if p["reading"] == f"needs seed {seed}"]
    rels = {cell_config(arm, p["batch"], p["family"]) for p in open_pairs for arm in (p["a"], p["b"])}
    return sorted(os.path.relpath(os.path.join(GRID_DIR, r)) for r in rels if r)


def collect(root, out_dir, log=print):
    """Every run under ``root`` into out_dir/bccd_{sweep,grid,study}.* (tables, CSVs, plots),
    bccd_noise.md (the rule) and bccd_errors.md; keeps each finished run's test detections first."""
    runs = {d: load_run(d, seed=seed) for d, seed in find_runs(root).items()}
    for d, r in runs.items():
        if r.status == "ok":
            keep_test_detections(d)
    parts = selections(root, runs)
    os.makedirs(out_dir, exist_ok=True)
    for name in ("sweep", "grid", "study"):
        if parts[name]:
            curves = parts["grid_val"] if name == "grid" else None
            write_all(parts[name], os.path.join(out_dir, f"bccd_{name}"), curve_runs=curves)
            ok = sum(r.status == "ok" for r in parts[name])
            log(f"bccd_{name}: {ok}/{len(parts[name])} runs finished -> {os.path.join(out_dir, f'bccd_{name}')}.md")
    tested = [r for r in parts["grid"] + parts["study"] if r.status == "ok"]
    if tested:
        noise = TestNoise(tested)
        with open(os.path.join(out_dir, "bccd_noise.md"), "w") as f:
            f.write(noise_markdown(parts["grid"], parts["study"], noise))
        with open(os.path.join(out_dir, "bccd_errors.md"), "w") as f:
            f.write(errors_markdown(parts["grid"], noise))
        with open(os.path.join(out_dir, "bccd_pairs.json"), "w") as f:
            json.dump(pair_rows(parts["grid"], noise), f, indent=1)
    cpu_h = sum(r.result.get("wall_time_s", 0) for r in runs.values() if r.status == "ok") / 3600
    log(f"{sum(r.status == 'ok' for r in runs.values())} finished runs under {root}: {cpu_h:.1f} CPU-hours "
        "(one thread each: wall time)")

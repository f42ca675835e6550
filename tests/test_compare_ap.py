"""experiments/compare (runs, stats, tables, plots, report, grid) and `python -m experiments.compare_ap`
over them, on hand-made run directories (no training)."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from experiments.compare import grid
from experiments.compare.plots import plot
from experiments.compare.report import write_all
from experiments.compare.runs import load_run
from experiments.compare.stats import aggregate, lr_sweep, paired_differences
from experiments.compare.tables import RUN_COLUMNS, markdown
from experiments.cpu_grid.configs import settings
from experiments.paths import REPO
from frn_det.engine.processes import LOG_FILE, STATUS_FILE
from frn_det.engine.results import COCO_METRICS as METRICS
from frn_det.engine.processes import LOG_FILE
from frn_det.engine.results import RESULT_FILE


def write_run(d, norm="FRN", ipg=2, seed=0, ap=10.0, segm_ap=None, gpus=1, config="configs/fam/x.yaml"):
    os.makedirs(d, exist_ok=True)
    res = {"bbox": {"AP": ap, "AP50": ap + 20, "AP75": ap - 1, "APs": ap / 2, "APm": ap, "APl": ap * 2}}
    if segm_ap is not None:
        res["segm"] = {m: segm_ap for m in METRICS}
    out = {"config_file": config, "meta_architecture": "RetinaNet", "norm": norm, "images_per_gpu": ipg,
           "num_gpus": gpus, "ims_per_batch": ipg * gpus, "seed": seed, "max_iter": 100,
           "base_lr": 0.01, "train_datasets": ["t"], "test_datasets": ["v"], "wall_time_s": 1.0,
           "results": res}
    with open(os.path.join(d, RESULT_FILE), "w") as f:
        json.dump(out, f)
    return d


@pytest.fixture
def runs(tmp_path):
    """FRN at 2 img/GPU: 3 seeds (AP 10, 12, 14; segm 5, 6, 7); GN at 2 and 4 img/GPU: 1 seed each;
    plus a missing run, a failed run (non-zero exit) and a NaN run."""
    dirs = [write_run(str(tmp_path / f"frn2_s{s}"), seed=s, ap=ap, segm_ap=sg)
            for s, ap, sg in ((0, 10.0, 5.0), (1, 12.0, 6.0), (2, 14.0, 7.0))]
    dirs.append(write_run(str(tmp_path / "gn2_s0"), norm="GN", ap=8.0))
    dirs.append(write_run(str(tmp_path / "gn4_s0"), norm="GN", ipg=4, ap=9.0))
    dirs.append(str(tmp_path / "never_ran"))
    failed = tmp_path / "bn1_s0"
    failed.mkdir()
    (failed / STATUS_FILE).write_text(json.dumps(
        {"command": ["py", "train_net.py", "--config-file", "c/bn_1.yaml", "SEED", "0"], "returncode": 1}))
    (failed / LOG_FILE).write_text(
        "iter 10 loss 3.2\nFloatingPointError: Loss became infinite or NaN at iteration=12!\nbye\n")
    dirs.append(str(failed))
    dirs.append(write_run(str(tmp_path / "bn1_s1"), norm="BN", ipg=1, ap=float("nan")))
    return [load_run(d) for d in dirs]


def test_statuses_and_reasons(runs):
    by_dir = {os.path.basename(r.run_dir): r for r in runs}
    assert [by_dir[k].status for k in ("frn2_s0", "gn2_s0", "gn4_s0")] == ["ok"] * 3
    assert by_dir["never_ran"].status == "missing" and "no run directory" in by_dir["never_ran"].reason
    assert by_dir["bn1_s0"].status == "failed"
    assert "exited with 1" in by_dir["bn1_s0"].reason and "Loss became infinite" in by_dir["bn1_s0"].reason
    assert (by_dir["bn1_s0"].config_file, by_dir["bn1_s0"].seed) == ("c/bn_1.yaml", 0)
    assert by_dir["bn1_s1"].status == "failed" and "NaN" in by_dir["bn1_s1"].reason


def test_aggregation_numbers(runs):
    groups = aggregate(runs)
    assert list(groups) == [("fam", "BN", 1, 1), ("fam", "FRN", 2, 1), ("fam", "GN", 2, 1), ("fam", "GN", 4, 1)]
    frn = groups[("fam", "FRN", 2, 1)]
    ap = frn["stats"][("bbox", "AP")]
    assert ap["n"] == 3 and ap["mean"] == pytest.approx(12.0) and ap["std"] == pytest.approx(2.0)
    assert (ap["min"], ap["max"]) == (10.0, 14.0)
    assert frn["stats"][("bbox", "AP50")]["mean"] == pytest.approx(32.0)
    assert frn["stats"][("segm", "AP")]["mean"] == pytest.approx(6.0)
    assert frn["stats"][("segm", "AP")]["std"] == pytest.approx(1.0)
    assert frn["seeds"] == [0, 1, 2] and frn["tasks"] == ["bbox", "segm"]
    gn = groups[("fam", "GN", 2, 1)]
    assert gn["stats"][("bbox", "AP")]["std"] == 0.0 and gn["tasks"] == ["bbox"]
    # the NaN BN run has a group (its result says norm and images per GPU) but nothing averaged in;
    # the crashed one's config does not exist, so it is only listed
    bn = groups[("fam", "BN", 1, 1)]
    assert len(bn["runs"]) == 1 and bn["ok"] == [] and bn["stats"] == {}


def test_outputs(runs, tmp_path):
    prefix = str(tmp_path / "out" / "ap")
    write_all(runs, prefix)
    with open(prefix + "_groups.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["norm"], r["images_per_gpu"], r["n_runs"], r["n_failed"]) for r in rows] == [
        ("BN", "1", "0", "1"), ("FRN", "2", "3", "0"), ("GN", "2", "1", "0"), ("GN", "4", "1", "0")]
    assert rows[0]["bbox_AP_mean"] == ""
    assert float(rows[1]["bbox_AP_mean"]) == pytest.approx(12.0)
    assert float(rows[1]["bbox_AP_std"]) == pytest.approx(2.0)
    assert rows[1]["seeds"] == "0 1 2" and rows[2]["segm_AP_mean"] == ""
    with open(prefix + ".csv") as f:
        per_run = list(csv.DictReader(f))
    assert len(per_run) == len(runs)
    assert sorted(r["status"] for r in per_run) == ["failed", "failed", "missing", "ok", "ok", "ok", "ok", "ok"]
    md = open(prefix + ".md").read()
    assert "| fam | FRN | 2 | 1 | 2 | 3 | 12.00 ± 2.00 | 10.00–14.00 |" in md
    assert "| fam | BN | 1 | 1 | 1 | 0/1 | all failed |" in md
    assert "Missing or failed runs (3 of 8)" in md
    assert "never_ran" in md and "Loss became infinite" in md and "NaN" in md
    png = open(prefix + ".png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_all_ok_markdown_says_so(tmp_path):
    runs = [load_run(write_run(str(tmp_path / "a"), ap=3.0))]
    md = markdown(aggregate(runs), runs)
    assert "All 1 runs finished." in md and "Missing" not in md


def compare_tool(argv):
    """`python -m experiments.compare_ap` as users run it, from the checkout's root: (exit code, stdout)."""
    proc = subprocess.run([sys.executable, "-m", "experiments.compare_ap", *argv], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode, proc.stdout


FAKE_TRAIN_NET = textwrap.dedent("""
    import json, os, sys
    args = sys.argv[1:]
    cfg = args[args.index("--config-file") + 1]
    seed = int(args[args.index("SEED") + 1])
    out = args[args.index("OUTPUT_DIR") + 1]
    with open(os.environ["FAKE_COUNTER"], "a") as f:
        f.write(f"{cfg} {seed} {' '.join(args[args.index('OUTPUT_DIR') + 2:])}\\n")
    if "bad" in cfg and seed == 1:
        print("RuntimeError: simulated crash", file=sys.stderr)
        sys.exit(3)
    norm = "GN" if "gn" in cfg else "FRN"
    ipg = int(cfg.split("_")[-1][0])
    res = {"config_file": cfg, "norm": norm, "images_per_gpu": ipg, "num_gpus": 1, "ims_per_batch": ipg,
           "seed": seed, "results": {"bbox": {m: 1.0 + seed for m in ["AP", "AP50", "AP75", "APs", "APm", "APl"]}}}
    json.dump(res, open(os.path.join(out, "frn_det_result.json"), "w"))
""")


def test_grid_launch_resumable_and_failure_reported(tmp_path, monkeypatch):
    train = tmp_path / "fake_train_net.py"
    train.write_text(FAKE_TRAIN_NET)
    counter = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_COUNTER", str(counter))
    cfg_dir = tmp_path / "grid"
    cfg_dir.mkdir()
    configs = [str(cfg_dir / n) for n in ("gn_2.yaml", "frn_2.yaml", "bad_frn_4.yaml")]
    root = str(tmp_path / "runs")
    out = str(tmp_path / "res" / "ap")
    argv = ["grid", "--configs", *configs, "--seeds", "0", "1", "--root", root, "--train-net", str(train),
            "--out", out, "--opts", "SOLVER.MAX_ITER", "7"]
    assert compare_tool(argv)[0] == 0
    calls = counter.read_text().splitlines()
    assert len(calls) == 6 and all(c.endswith("SOLVER.MAX_ITER 7") for c in calls)
    rows = list(csv.DictReader(open(out + "_groups.csv")))
    assert [(r["family"], r["norm"], r["images_per_gpu"], r["n_runs"]) for r in rows] == [
        ("grid", "FRN", "2", "2"), ("grid", "FRN", "4", "1"), ("grid", "GN", "2", "2")]
    assert float(rows[0]["bbox_AP_mean"]) == pytest.approx(1.5)
    md = open(out + ".md").read()
    assert "exited with 3" in md and "simulated crash" in md and "bad_frn_4.yaml seed 1" in md
    assert "| 1/2 |" in md  # FRN 4 img/GPU averages 1 of the 2 expected runs
    # second call: finished runs are skipped, only the failed one is retried
    assert compare_tool(argv)[0] == 0
    calls2 = counter.read_text().splitlines()
    assert len(calls2) == 7 and "bad_frn_4.yaml 1" in calls2[-1]


def test_dry_run_launches_nothing_and_imports_neither_torch_nor_detectron2(tmp_path):
    """experiments/cpu_grid/run.sh plans each stage through a dry run or skips: a moment each."""
    write_run(str(tmp_path / "r" / "c_done" / "seed3"))
    argv = ["grid", "--configs", "c/a.yaml", "c/done.yaml", "--seeds", "3", "--root", str(tmp_path / "r"),
            "--dry-run", "--out", str(tmp_path / "o")]
    code = ("import sys; from experiments.compare_ap import main; main(sys.argv[1:]); "
            "print('imported:', sorted({'torch', 'detectron2', 'frn_det'} & set(sys.modules)))")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not os.path.exists(tmp_path / "r" / "c_a") and "imported: []" in p.stdout
    assert "c/a.yaml seed 3: would run" in p.stdout and "SEED 3" in p.stdout and "--resume" in p.stdout
    assert "c/done.yaml seed 3: done already, skipped" in p.stdout


def test_the_grid_looks_for_the_result_file_train_net_writes():
    assert grid.RESULT_FILE == RESULT_FILE
    assert grid.LOG_FILE == LOG_FILE


def test_a_diverged_run_is_a_result_not_retried(tmp_path):
    """detectron2 stops a run whose loss became infinite with a FloatingPointError: rerunning it
    would diverge again (a learning-rate sweep's top rate), so the grid skips it and says why; a run
    that failed otherwise is retried."""
    root = tmp_path / "r"
    for name, line in (("c_high", "FloatingPointError: Loss became infinite or NaN at iteration=1141!"),
                       ("c_crash", "RuntimeError: simulated crash")):
        d = root / name / "seed0"
        d.mkdir(parents=True)
        (d / LOG_FILE).write_text("Traceback (most recent call last):\n" + line + "\n")
    argv = ["grid", "--configs", "c/high.yaml", "c/crash.yaml", "--seeds", "0", "--root", str(root),
            "--dry-run", "--out", str(tmp_path / "o")]
    p = subprocess.run([sys.executable, "-m", "experiments.compare_ap", *argv], capture_output=True, text=True,
                       cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert ("c/high.yaml seed 0: diverged (FloatingPointError: Loss became infinite or NaN at iteration=1141!), "
            "not retried") in p.stdout
    assert "c/crash.yaml seed 0: would run" in p.stdout


def test_nan_metric_other_than_ap_is_kept_as_nan(tmp_path):
    d = write_run(str(tmp_path / "a"), ap=4.0)
    res = json.load(open(os.path.join(d, RESULT_FILE)))
    res["results"]["bbox"]["APs"] = float("nan")  # no small objects in the val set
    json.dump(res, open(os.path.join(d, RESULT_FILE), "w"))
    g = aggregate([load_run(d)])
    st = g[("fam", "FRN", 2, 1)]["stats"]
    assert math.isnan(st[("bbox", "APs")]["mean"]) and st[("bbox", "AP")]["mean"] == 4.0


def test_crashed_run_grouped_by_its_config(tmp_path):
    """A run that died before writing its result still gets a table row, from what its config says."""
    cfg = os.path.join(REPO, "configs", "cpu_grid", "retinanet_R18_FPN", "BN_2img_lr0.01.yaml")
    d = tmp_path / "crashed"
    d.mkdir()
    (d / STATUS_FILE).write_text(json.dumps({"command": ["p", "t", "--config-file", cfg, "SEED", "1"],
                                                        "returncode": 1}))
    ok = load_run(write_run(str(tmp_path / "ok"), norm="BN", ipg=2, seed=0, ap=2.0, config=cfg))
    crashed = load_run(str(d))
    key = ("retinanet_R18_FPN", "BN lr0.01", 2, 1)  # the variant (after "<B>img_") joins the norm
    assert crashed.status == "failed" and crashed.key() == key
    assert crashed.images_seen == settings()["sweep_schedule"]["images_seen"]  # from its config: MAX_ITER x IMS_PER_BATCH
    groups = aggregate([ok, crashed])
    g = groups[key]
    assert len(g["runs"]) == 2 and g["ok"] == [ok] and g["stats"][("bbox", "AP")]["mean"] == 2.0
    md = markdown(groups, [ok, crashed])
    assert "| retinanet_R18_FPN | BN lr0.01 | 2 | 1 | 2 | 1/2 | 2.00 ± 0.00 |" in md
    only_failed = aggregate([crashed])
    plot(only_failed, str(tmp_path / "p.png"))  # a family with no finished run still plots
    assert os.path.getsize(tmp_path / "p.png") > 0


def _grid_run(tmp_path, norm, ipg, seed, ap, variant="", lr=0.01, curve_aps=(0.5, 0.8, 0.95, 1.0)):
    """A finished run of configs/<fam>/<norm>_<ipg>img[_variant].yaml with a 4-point learning curve."""
    name = f"{norm}_{ipg}img" + (f"_{variant}" if variant else "")
    d = write_run(str(tmp_path / f"{name}_s{seed}"), norm=norm, ipg=ipg, seed=seed, ap=ap,
                  config=f"configs/retinanet_R18_FPN/{name}.yaml")
    res = json.load(open(os.path.join(d, RESULT_FILE)))
    res.update(max_iter=800 // ipg, base_lr=lr,
               curve=[{"iteration": (i + 1) * 200 // ipg, "images_seen": (i + 1) * 200, "bbox": ap * f}
                      for i, f in enumerate(curve_aps)])
    json.dump(res, open(os.path.join(d, RESULT_FILE), "w"))
    return load_run(d)


def test_paired_differences_sweep_curves_and_run_table(tmp_path):
    runs = [_grid_run(tmp_path, n, 2, s, ap) for n, s, ap in
            (("FRN", 0, 30.0), ("FRN", 1, 33.0), ("GN", 0, 31.0), ("GN", 1, 32.0), ("GN", 2, 40.0), ("BN", 0, 20.0))]
    runs += [_grid_run(tmp_path, "FRN", 2, 0, ap, f"lr{lr:g}", lr) for lr, ap in ((0.005, 25.0), (0.02, 28.0))]
    runs.append(_grid_run(tmp_path, "FRN", 2, 0, 31.0, "RELU"))
    pairs = paired_differences(runs, "FRN", "GN")
    assert list(pairs) == [("retinanet_R18_FPN", 2)]  # the base runs only: variants are their own labels
    relu = paired_differences(runs, "FRN RELU", "FRN")[("retinanet_R18_FPN", 2)]
    assert relu["seeds"] == [0] and relu["diffs"] == [1.0]
    p = pairs[("retinanet_R18_FPN", 2)]
    assert p["seeds"] == [0, 1] and p["diffs"] == [-1.0, 1.0] and p["stats"]["mean"] == 0.0  # GN seed 2: no pair
    runs.append(_grid_run(tmp_path, "FRN", 8, 0, 20.0, "lr0.02", 0.02))  # base_lr is per batch: its own sweep
    # the plain FRN batch-2 run at lr 0.01 joins its sweep for seed 0, the seed the sweep ran (not seed 1)
    assert lr_sweep(runs) == {("FRN", 2): [(0.005, 25.0, 1), (0.01, 30.0, 1), (0.02, 28.0, 1)],
                                         ("FRN", 8): [(0.02, 20.0, 1)]}
    assert runs[0].last_quarter_change() == pytest.approx(30.0 * (1.0 - 0.95))
    prefix = str(tmp_path / "out" / "grid")
    write_all(runs, prefix)
    md = open(prefix + ".md").read()
    assert "Paired differences FRN - GN" in md and "| retinanet_R18_FPN | 2 | 0 1 | -1.00, +1.00 | +0.00 ± 1.41 |" in md
    assert "| FRN batch 2 | 0.005: 25.00, 0.01: 30.00, 0.02: 28.00 |" in md and "| FRN batch 8 | 0.02: 20.00 |" in md
    assert "| FRN RELU |" in md
    # a study arm against the runs it is paired with; a learning-rate sweep point is not an arm
    assert "Paired differences FRN RELU - FRN" in md and "| retinanet_R18_FPN | 2 | 0 | +1.00 | +1.00 ± 0.00 |" in md
    assert "Paired differences FRN RELU - GN" in md and "FRN lr0.005 -" not in md
    rows = list(csv.DictReader(open(prefix + ".csv")))
    assert list(rows[0]) == list(RUN_COLUMNS)
    relu = next(r for r in rows if r["variant"] == "RELU")
    assert (relu["norm"], relu["images_per_batch"], relu["images_seen"], relu["AP"], relu["status"]) == \
        ("FRN", "2", "800", "31.00", "ok")
    for png in ("", "_curves", "_lr_sweep"):
        assert open(prefix + png + ".png", "rb").read()[:4] == b"\x89PNG"


def test_group_without_a_finished_run_says_why(tmp_path):
    """A cell whose runs are still training reads "not finished", one whose runs crashed "all failed"."""
    config = "configs/cpu_grid/retinanet_R18_FPN/GN_1img.yaml"

    def launched(name, returncode):
        d = tmp_path / name
        d.mkdir()
        (d / STATUS_FILE).write_text(json.dumps(
            {"command": ["py", "train_net.py", "--config-file", config, "SEED", "0"], "returncode": returncode}))
        return load_run(str(d))

    def cell(runs):
        md = markdown(aggregate(runs), runs)
        return next(ln for ln in md.splitlines() if ln.startswith("| retinanet_R18_FPN | GN | 1 |"))

    training, crashed = launched("training", None), launched("crashed", 1)
    assert (training.status, crashed.status) == ("missing", "failed")
    assert "| 0/1 | not finished |" in cell([training])
    assert "| 0/1 | all failed |" in cell([crashed])
    assert "| 0/2 | failed or not finished |" in cell([training, crashed])


def test_a_plain_run_on_another_schedule_stays_out_of_the_sweep(tmp_path):
    """The grid cell at batch 2 trains longer than the batch-2 sweep: it is not one of its points."""
    sweep = [_grid_run(tmp_path, "GN", 2, 0, ap, f"lr{lr:g}", lr) for lr, ap in ((0.005, 25.0), (0.02, 28.0))]
    cell = _grid_run(tmp_path, "GN", 2, 0, 31.0)
    assert lr_sweep(sweep + [cell])[("GN", 2)][1] == (0.01, 31.0, 1)
    cell.result["max_iter"] *= 2
    assert lr_sweep(sweep + [cell]) == {("GN", 2): [(0.005, 25.0, 1), (0.02, 28.0, 1)]}

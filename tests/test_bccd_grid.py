"""The BCCD comparison (experiments/bccd): its configs, run.sh's stages and order (dry runs in a
scratch copy), and the report on hand-made runs: choices on bccd_val, numbers on bccd_test, a batch-2
cell labelled as its arm, the test detections kept and the decision rule's readings."""
import copy
import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from detectron2.data import MetadataCatalog

from experiments.bccd import configs as bccd
from experiments.bccd.report import DETECTIONS, collect
from experiments.compare.bootstrap import ImageWeightedAP
from experiments.paths import REPO
from frn_det.data import ensure_coco_json
from frn_det.engine import load_cfg
from frn_det.engine.coco_eval import load_ground_truth

G = "configs/bccd_grid/retinanet_R18_FPN"
RUN_LINE = re.compile(r"^\[\d+/\d+\] configs/bccd_grid/retinanet_R18_FPN/(\S+)\.yaml seed (\d+): would run", re.M)


def test_sweep_configs_train_on_train_and_evaluate_val_then_test():
    for arm, configs in bccd.sweep_configs().items():
        for rel, lr_per_image in configs:
            cfg = load_cfg(os.path.join(bccd.GRID_DIR, rel))
            assert cfg.DATASETS.TRAIN == ("bccd_train",) and cfg.DATASETS.TEST == ("bccd_val", "bccd_test")
            assert cfg.SOLVER.BASE_LR == pytest.approx(float(lr_per_image) * cfg.SOLVER.IMS_PER_BATCH)
            assert cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH == bccd.settings()["schedule"]["images_seen"]
            assert (cfg.MODEL.RESNETS.NORM, cfg.MODEL.FRN.CENTERED) == (bccd.settings()["arms"][arm]["norm"],
                                                                        arm == "FRN centered")
            # the variant is pinned to the fused op (plan.md): one implementation for every centred run
            assert cfg.MODEL.FRN.IMPL == ("op" if arm == "FRN centered" else "auto")


def scratch_repo(tmp_path, best=None):
    """experiments/ (the scripts and the real compare_ap) in a scratch checkout, grid.yaml's best rates set."""
    shutil.copytree(os.path.join(REPO, "experiments"), tmp_path / "experiments",
                    ignore=shutil.ignore_patterns("__pycache__"))
    if best:
        path = tmp_path / "experiments" / "bccd" / "grid.yaml"
        data = yaml.safe_load(path.read_text())
        data["best_lr_per_image"] = best
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return tmp_path


def dry_run(repo):
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, PYTHONPATH=str(repo))
    p = subprocess.run(["bash", str(repo / "experiments" / "bccd" / "run.sh")], env=env, capture_output=True, text=True,
                       timeout=300, cwd=repo)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_run_sh_pilot_then_sweep_then_asks_for_the_best_rates(tmp_path):
    out = dry_run(scratch_repo(tmp_path, {"BN": None, "GN": None, "FRN": None, "FRN centered": None}))
    sweep = [os.path.basename(rel)[:-5] for configs in bccd.sweep_configs().values() for rel, _ in configs]
    pilot = ["GN_2img_lr0.02", "FRN_2img_lr0.01"]
    assert RUN_LINE.findall(out) == [(n, "0") for n in pilot] + [(n, "0") for n in sweep]
    assert "set best_lr_per_image" in out


@pytest.mark.slow
def test_run_sh_grid_and_study_once_the_rates_are_set(tmp_path):
    best = {"BN": "0.02", "GN": "0.01", "FRN": "0.005", "FRN centered": "0.005"}
    out = dry_run(scratch_repo(tmp_path, best))
    cells2 = ["BN_2img_lr0.04", "GN_2img_lr0.02", "FRN_2img_lr0.01", "FRN_2img_centered_lr0.01"]
    cells1 = ["BN_1img", "GN_1img", "FRN_1img", "FRN_1img_centered"]
    runs = RUN_LINE.findall(out)
    sweep = yaml.safe_load((tmp_path / "experiments" / "bccd" / "grid.yaml").read_text())["sweep_lr_per_image"]
    after_sweep = runs[2 + sum(map(len, sweep.values())):]  # after the pilot and the sweep
    cells8 = ["BN_8img", "GN_8img", "FRN_8img", "FRN_8img_centered"]
    assert after_sweep == ([(n, "1") for n in cells2] + [(n, s) for s in "01" for n in cells1]
                           + [(n, s) for s in "01" for n in ("FRN_2img_G32", "FRN_2img_GN-fpn-head")]
                           + [(n, s) for s in "01" for n in cells8])  # (no pair needs seed 2 in a dry run)
    two_stage = re.findall(r"configs/bccd_grid/faster_rcnn_R18_FPN/(\S+)\.yaml seed (\d+): would run", out)
    assert two_stage == [(n, s) for s in "01" for n in ("GN_2img", "FRN_2img", "FRN_2img_centered")]


def fake_run(root, rel, seed, val_ap, test_detections, norm, batch, wall=3600.0):
    """A finished run directory of the BCCD grid with its results on both datasets (test: the AP of
    ``test_detections``, as COCOEvaluator would have it) and its test detections."""
    fam, name = rel.split("/")
    d = root / f"{fam}_{name[:-5]}" / f"seed{seed}"
    (d / "inference" / "bccd_test").mkdir(parents=True)
    (d / "inference" / "bccd_test" / "coco_instances_results.json").write_text(json.dumps(test_detections))

    def res(ap):
        return {"bbox": {"AP": ap, "AP50": ap, "AP75": ap, "APs": ap, "APm": ap, "APl": ap, "AP-RBC": ap, "AP-WBC": ap,
                         "AP-Platelets": ap}}

    curve = [{"iteration": i, "images_seen": i * batch, "bbox": val_ap - (4 - k)} for k, i in enumerate((1200, 2400, 3600, 4800))]
    test_ap = float(ImageWeightedAP(load_ground_truth(MetadataCatalog.get("bccd_test").json_file),
                                    str(d / "inference" / "bccd_test" / "coco_instances_results.json"))(np.ones((1, 72)))[0])
    by = {"bccd_val": {"results": res(val_ap), "curve": curve}, "bccd_test": {"results": res(test_ap), "curve": curve}}
    (d / "frn_det_result.json").write_text(json.dumps({
        "config_file": f"configs/bccd_grid/{rel}", "meta_architecture": "RetinaNet", "norm": norm,
        "images_per_gpu": batch, "num_gpus": 1, "ims_per_batch": batch, "seed": seed, "max_iter": 9600 // batch,
        "base_lr": float(re.search(r"lr([0-9.]+)\.yaml", rel).group(1)), "train_datasets": ["bccd_train"], "test_datasets": ["bccd_val", "bccd_test"], "wall_time_s": wall,
        "curve": curve, "results": res(val_ap), "by_dataset": by}))
    return d


@pytest.fixture(scope="module")
def test_ground_truth():
    ensure_coco_json("bccd_test")
    with open(MetadataCatalog.get("bccd_test").json_file) as f:
        return json.load(f)


def detections(gt, drop_every=0, seed=0):
    """Detections of bccd_test's boxes (score 0.9, a little jitter), missing every ``drop_every``-th."""
    rng = np.random.default_rng(seed)
    out = []
    for i, a in enumerate(gt["annotations"]):
        if drop_every and i % drop_every == 0:
            continue
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
                    "bbox": [float(v + rng.normal(0, 1)) for v in a["bbox"]]})
    return out


def test_report_reads_choices_on_val_and_numbers_on_test(tmp_path, monkeypatch, test_ground_truth):
    settings = copy.deepcopy(bccd.settings())
    settings["best_lr_per_image"] = {"BN": None, "GN": "0.01", "FRN": "0.005", "FRN centered": None}
    settings["batches"] = [2]
    monkeypatch.setattr(bccd, "settings", lambda: settings)
    monkeypatch.setattr("experiments.bccd.report.settings", lambda: settings)
    root = tmp_path / "runs"
    gt = test_ground_truth
    fam = "retinanet_R18_FPN"
    # GN's sweep: its best (val) is lr 0.02 per batch; FRN's: 0.01. Both cells have two seeds.
    fake_run(root, f"{fam}/GN_2img_lr0.01.yaml", 0, 40.0, detections(gt, 3), "GN", 2)
    for seed in (0, 1):
        fake_run(root, f"{fam}/GN_2img_lr0.02.yaml", seed, 45.0, detections(gt, seed=seed), "GN", 2)
        fake_run(root, f"{fam}/FRN_2img_lr0.01.yaml", seed, 42.0, detections(gt, 2, seed=seed), "FRN", 2)
    unfinished = root / f"{fam}_FRN_2img_lr0.02" / "seed0"
    unfinished.mkdir(parents=True)
    out = tmp_path / "docs"
    collect(str(root), str(out), log=lambda *_: None)

    sweep = (out / "bccd_sweep.md").read_text()
    assert "| GN batch 2 | 0.01: 40.00, 0.02: 45.00 |" in sweep and "| FRN batch 2 | 0.01: 42.00 |" in sweep  # val APs
    assert "missing: " in sweep and "FRN_2img_lr0.02" in sweep  # still training
    grid = (out / "bccd_grid.csv").read_text().splitlines()
    assert len(grid) == 1 + 4 and all(float(row.split(",")[7]) > 30 for row in grid[1:])  # the test AP of each cell
    assert not any("lr0.02" in row.split(",")[2] for row in grid[1:])  # variant: the arm's, not the lr
    noise = (out / "bccd_noise.md").read_text()
    # FRN missed every other box: far behind GN, beyond any noise
    row = next(line for line in noise.splitlines() if line.startswith("| retinanet_R18_FPN | 2 | FRN - GN |"))
    assert row.endswith("| behind |")
    for seed in (0, 1):
        assert (root / f"{fam}_GN_2img_lr0.02" / f"seed{seed}" / DETECTIONS).is_file()
    with gzip.open(root / f"{fam}_GN_2img_lr0.02" / "seed0" / DETECTIONS, "rt") as f:
        assert len(json.load(f)) == len(gt["annotations"])
    assert "## GN, retinanet_R18_FPN, batch 2" in (out / "bccd_errors.md").read_text()

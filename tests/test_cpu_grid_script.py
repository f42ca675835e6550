"""experiments/cpu_grid/run.sh: the stages of the CPU comparison and their order, read from its dry run
in a scratch copy of the checkout's layout (the real configs' names, no training)."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from experiments.cpu_grid.configs import grid_variants
from experiments.paths import REPO

pytestmark = pytest.mark.slow  # subprocess runs (see tests/conftest.py: the fast tier is -m "not slow")

RUN_LINE = re.compile(r"^\[\d+/\d+\] configs/cpu_grid/(\S+)\.yaml seed (\d+): would run", re.M)
SWEEP = [f"retinanet_R18_FPN/{n}_2img_lr{lr}" for n in ("BN", "FRN", "GN") for lr in ("0.005", "0.01", "0.02")]
GRID = [f"retinanet_R18_FPN/{n}_{b}img" for n in ("BN", "GN", "FRN") for b in (1, 2, 8)]
MORE = [f"retinanet_R18_FPN/FRN_2img_{v}" for v in ("RELU", "eps-all", "fpn-no-norm")] + \
       [f"mask_rcnn_R18_FPN/{n}_2img" for n in ("GN", "FRN")]
STUDY = [f"retinanet_R18_FPN/FRN_2img_{v}" for v in ("centered", "G32-centered", "GN-fpn-head", "G32")] + \
        ["retinanet_R18_FPN/GN_2img_FRN-fpn-head"]
STUDY2 = [f"retinanet_R18_FPN/{n}_2img_{v}" for v in ("clutter", "zero-init") for n in ("FRN", "GN")] + \
         ["retinanet_R18_FPN/FRN_2img_clip-2xlr"]
CLUTTER_LR = [f"retinanet_R18_FPN/{n}_2img_clutter-2xlr" for n in ("FRN", "GN")]
OP_CHECK = ["retinanet_R18_FPN/FRN_2img_centered-op"]  # the centred arm through the fused op
# the study arms promoted to the grid (grid.yaml's grid_variants) at every batch
VARIANTS = [rel[:-len(".yaml")] for rel, *_ in grid_variants()]
SWEEP8 = [f"retinanet_R18_FPN/{n}_8img_lr{lr}" for n, lr in (("BN", "0.04"), ("FRN", "0.01"), ("GN", "0.02"))]


def scratch_repo(tmp_path, leaves):
    """experiments/ (the script and the real compare_ap) and configs/cpu_grid/<leaf>.yaml for ``leaves``."""
    shutil.copytree(os.path.join(REPO, "experiments"), tmp_path / "experiments",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for leaf in leaves:
        path = tmp_path / "configs" / "cpu_grid" / f"{leaf}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    return tmp_path


def dry_run(repo):
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable)
    p = subprocess.run(["bash", str(repo / "experiments" / "cpu_grid" / "run.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.parametrize("have", [[], [leaf for leaf in GRID + MORE if "GN" not in leaf]])
def test_sweep_first_then_asks_for_the_best_rates(tmp_path, have):
    """Without every grid leaf (no norm's best rate yet, or GN's still missing) only the sweep runs."""
    out = dry_run(scratch_repo(tmp_path, SWEEP + have))
    assert RUN_LINE.findall(out) == [(leaf, "0") for leaf in sorted(SWEEP)]
    missing = next(leaf for leaf in GRID + MORE if leaf not in have)
    assert f"No configs/cpu_grid/{missing}.yaml" in out and "best_lr_per_image" in out


@pytest.mark.parametrize("sweep8", [[], SWEEP8], ids=["no_batch8_sweep", "batch8_sweep"])
def test_seed_zero_of_everything_before_more_seeds(tmp_path, sweep8):
    out = dry_run(scratch_repo(tmp_path, SWEEP + GRID + MORE + sweep8 + STUDY + VARIANTS + STUDY2 + CLUTTER_LR + OP_CHECK))
    expected = ([(leaf, "0") for leaf in sorted(SWEEP)]
                + [(leaf, "0") for leaf in GRID] + [(leaf, "0") for leaf in MORE]
                + [(leaf, "0") for leaf in sorted(sweep8)]
                + [(leaf, "1") for leaf in GRID] + [(leaf, "1") for leaf in MORE]
                + [(leaf, "2") for leaf in GRID]
                + [(leaf, s) for s in "012" for leaf in VARIANTS]
                + [(leaf, "0") for leaf in STUDY] + [(leaf, "1") for leaf in STUDY]
                + [(leaf, "0") for leaf in STUDY2] + [(leaf, "1") for leaf in STUDY2]
                # the arms whose two seeds leave the reading open
                + [(f"retinanet_R18_FPN/{leaf}", "2") for leaf in ("FRN_2img_GN-fpn-head", "FRN_2img_clutter",
                                                                     "GN_2img_clutter")]
                + [(leaf, "0") for leaf in CLUTTER_LR]  # the cluttered task at twice the rates
                + [(leaf, s) for s in "01" for leaf in OP_CHECK])
    assert RUN_LINE.findall(out) == expected
    assert "No configs/" not in out


def test_each_part_is_collected_for_its_figures(tmp_path):
    """`python -m experiments.compare_ap cpu-grid` (the script's collect after each stage): every run into cpu_grid.*,
    and each part into its own files with exactly its runs and seeds; a run still training counts
    as not finished."""
    leaves = SWEEP + GRID + MORE + SWEEP8 + STUDY + STUDY2 + [v for v in VARIANTS if v not in STUDY]
    seeds = {leaf: (0,) if leaf in SWEEP + SWEEP8 else (0, 1) if leaf in MORE + STUDY + STUDY2 else (0, 1, 2)
             for leaf in leaves}
    root = tmp_path / "runs"
    for leaf, leaf_seeds in seeds.items():
        fam, name = leaf.split("/")
        norm, ipg = name.split("_")[0], int(name.split("_")[1][:-len("img")])
        for seed in leaf_seeds:
            d = root / f"{fam}_{name}" / f"seed{seed}"
            d.mkdir(parents=True)
            if (leaf, seed) == (GRID[0], 2):
                continue  # still training
            (d / "frn_det_result.json").write_text(json.dumps({
                "config_file": f"configs/cpu_grid/{leaf}.yaml", "meta_architecture": "RetinaNet", "norm": norm,
                "images_per_gpu": ipg, "num_gpus": 1, "ims_per_batch": ipg, "seed": seed, "max_iter": 12800 // ipg,
                "base_lr": 0.01, "train_datasets": ["t"], "test_datasets": ["v"], "wall_time_s": 1.0,
                "results": {"bbox": {"AP": 50.0, "AP50": 70.0, "AP75": 55.0, "APs": 40.0, "APm": 50.0, "APl": 60.0}}}))
    (root / "retinanet_R18_FPN_BN_2img_lr0.01" / "seed0.bak").mkdir()  # strays are not runs
    (root / "retinanet_R18_FPN_BN_8img" / "seed1.log").write_text("")
    out = tmp_path / "docs"
    p = subprocess.run([sys.executable, "-m", "experiments.compare_ap", "cpu-grid", "--root", str(root),
                        "--out-dir", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]

    def collected(name):
        with open(out / f"{name}.csv") as f:
            return sorted((row["run_dir"].split(os.sep)[-2], int(row["seed"] or row["run_dir"][-1]), row["status"])
                          for row in csv.DictReader(f))

    def expected(chosen, only_seed=None):
        return sorted((leaf.replace("/", "_"), s, "missing" if (leaf, s) == (GRID[0], 2) else "ok")
                      for leaf in chosen for s in seeds[leaf] if only_seed in (None, s))

    assert collected("cpu_grid") == expected(leaves)
    assert collected("cpu_grid_norms") == expected(GRID + [leaf for leaf in MORE if leaf.startswith("mask")])
    assert collected("cpu_grid_ablations") == expected(["retinanet_R18_FPN/FRN_2img"]
                                                       + [leaf for leaf in MORE if "FRN_2img_" in leaf])
    assert collected("cpu_grid_sweep") == expected(SWEEP)
    assert collected("cpu_grid_sweep_batch8") == expected(SWEEP8 + [leaf for leaf in GRID if "8img" in leaf], 0)
    assert collected("cpu_grid_study") == expected(STUDY + STUDY2 + ["retinanet_R18_FPN/FRN_2img",
                                                                     "retinanet_R18_FPN/GN_2img"])
    assert collected("cpu_grid_variants") == expected(VARIANTS + [leaf for leaf in GRID if "BN" not in leaf])
    assert "cpu_grid_norms: 30/31 runs finished" in p.stdout

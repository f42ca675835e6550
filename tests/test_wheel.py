"""A wheel built from the checkout, installed outside it (not editable), works on its own: `import
frn_det`, the norm name, building a model from a shipped config, the LazyConfig twins, and
tools/train_net.py with a shipped config. The package must never reach into the checkout."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from train_net_testing import dataset_args, run_opts, tiny_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", ".cache", "build", "dist", "output", "datasets", "docs",
                                     "__pycache__", "*.so", "*.egg-info", ".whl")

INSTALLED_CHECKS = textwrap.dedent("""
    import os, sys
    site = sys.argv[1]
    import frn_det
    from frn_det import model_zoo
    from frn_det.layers import ops
    from detectron2.config import LazyConfig
    from detectron2.layers import get_norm
    from detectron2.modeling import build_model
    assert frn_det.__file__.startswith(site), frn_det.__file__
    assert ops.is_available(), ops.load_error()
    assert type(get_norm("FRN", 8)).__name__ == "FilterResponseNorm2d"
    cfg_file = model_zoo.get_config_file("synthetic/retinanet_R18_FPN_FRN.yaml")
    assert cfg_file.startswith(site), cfg_file
    model = build_model(model_zoo.get_config("synthetic/retinanet_R18_FPN_FRN.yaml"))
    print("FRN layers", sum(type(m).__name__ == "FilterResponseNorm2d" for m in model.modules()))
    for rel in ("coco/retinanet_R_50_FPN/FRN_2img.yaml", "coco/mask_rcnn_R_50_FPN/GN_8img.yaml"):
        model_zoo.get_config(rel)
    lazy = LazyConfig.load(model_zoo.get_config_file("lazy/retinanet_R_50_FPN_FRN.py"))
    print("lazy lr", lazy.optimizer.lr)
    assert not os.path.exists(os.path.join(model_zoo.CONFIG_ROOT, "cpu_grid")), "the study's grids are not shipped"
    try:
        model_zoo.get_config_file("cpu_grid/retinanet_R18_FPN/FRN_2img.yaml")
    except FileNotFoundError as e:
        print("missing:", e)
""")


# make test's workers (pytest-xdist --dist loadgroup) run these on one worker: one wheel build
pytestmark = pytest.mark.xdist_group("wheel")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder the wheel is installed into, environment that imports frn_det from there)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, site = tmp / "src", tmp / "dist", tmp / "site"
    shutil.copytree(REPO, src, symlinks=True, ignore=NOT_SOURCES)  # a fresh tree: no build/ of the editable install
    env = dict(os.environ, MAX_JOBS="2")
    env.pop("FORCE_CUDA", None)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
                   check=True, env=env, cwd=tmp, capture_output=True)
    (wheel,) = dist.glob("frn_det-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   cwd=tmp, capture_output=True)
    # PYTHONPATH comes before the editable install of the checkout in the test environment
    return str(site), dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_installed_wheel_imports_and_builds_from_shipped_configs(installed, tmp_path):
    site, env = installed
    p = subprocess.run([sys.executable, "-c", INSTALLED_CHECKS, site], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "FRN layers" in p.stdout and "FRN layers 0" not in p.stdout
    assert "lazy lr 0.05" in p.stdout
    assert "missing: 'cpu_grid/retinanet_R18_FPN/FRN_2img.yaml' is not a config shipped with frn-det" in p.stdout


@pytest.mark.slow
def test_train_net_with_a_shipped_config_from_the_installed_wheel(installed, tmp_path):
    site, env = installed
    root = str(tmp_path / "data")
    tiny_dataset(root)
    cfg = os.path.join(site, "frn_det", "configs", "synthetic", "retinanet_R18_FPN_FRN.yaml")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", cfg,
                        *dataset_args(root), *run_opts(out, max_iter=2)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert (out / "frn_det_result.json").is_file()

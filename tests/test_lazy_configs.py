"""configs/lazy: each LazyConfig instantiates the same model as its yacs twin (module types and
placement, parameter names and shapes), trains a step and evaluates on CPU; tools/lazy_train_net.py
end to end."""
import json
import os
import subprocess
import sys

import detectron2.data.transforms as T
import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from train_net_testing import assert_this_checkout, tiny_dataset

import frn_det  # noqa: F401
from frn_det.data import register_coco_dataset
from frn_det.engine import load_cfg
from frn_det.engine.lazy import lazy_result, load_lazy_cfg, train
from frn_det.layers import FilterResponseNorm2d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = os.path.join(REPO, "configs", "lazy", "{}.py")
TWINS = {
    "retinanet_R18_FPN_FRN_synthetic": "configs/synthetic/retinanet_R18_FPN_FRN.yaml",
    "mask_rcnn_R18_FPN_FRN_synthetic": "configs/synthetic/mask_rcnn_R18_FPN_FRN.yaml",
    "retinanet_R_50_FPN_FRN": "configs/coco/retinanet_R_50_FPN/FRN_8img.yaml",
    "mask_rcnn_R_50_FPN_FRN": "configs/coco/mask_rcnn_R_50_FPN/FRN_8img.yaml",
}


def test_every_shipped_lazy_config_has_a_twin():
    shipped = {f[:-3] for f in os.listdir(os.path.join(REPO, "configs", "lazy")) if f.endswith(".py")}
    assert shipped == set(TWINS)


def _frn_layers(model):
    return {n: (m.tau is not None, m.eps_l is not None, m.eps, m.impl) for n, m in model.named_modules()
            if isinstance(m, FilterResponseNorm2d)}


@pytest.mark.parametrize("name", list(TWINS))
def test_lazy_config_builds_the_model_of_its_yacs_twin(name):
    torch.manual_seed(0)
    lazy = instantiate(load_lazy_cfg(LAZY.format(name)).model)
    yacs = build_model(load_cfg(os.path.join(REPO, TWINS[name]), ["MODEL.DEVICE", "cpu"]))
    assert [type(m).__name__ for m in lazy.modules()] == [type(m).__name__ for m in yacs.modules()]
    assert {n: p.shape for n, p in lazy.named_parameters()} == {n: p.shape for n, p in yacs.named_parameters()}
    assert _frn_layers(lazy) == _frn_layers(yacs)  # FRN+TLU / learned eps where the yacs build puts them
    assert "FRNBasicStem" in [type(m).__name__ for m in lazy.modules()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lazy_data"))
    tiny_dataset(root, seed=2)
    names = {}
    for split in ("train", "val"):
        names[split] = f"lazy_tiny_{split}"
        register_coco_dataset(names[split], os.path.join(root, "annotations", f"instances_{split}.json"),
                              os.path.join(root, split))
    return root, names


def _on_tiny(cfg, names, output_dir):
    cfg.dataloader.train.dataset.names = names["train"]
    cfg.dataloader.test.dataset.names = names["val"]
    cfg.dataloader.train.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=(64,), max_size=64,
                                                                      sample_style="choice")]
    cfg.dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=64)]
    cfg.dataloader.train.update(total_batch_size=2, num_workers=0)
    cfg.dataloader.test.num_workers = 0
    cfg.dataloader.evaluator.output_dir = output_dir
    cfg.train.update(device="cpu", max_iter=1, eval_period=1, output_dir=output_dir)
    model = cfg.model.model  # inside with_frn_placement: keep every detection of a barely trained model
    if "roi_heads" in model:  # and predict the tiny dataset's 5 classes (COCO configs have 80)
        model.roi_heads.box_predictor.test_score_thresh = 0.0
        model.roi_heads.num_classes = 5
    else:
        model.update(test_score_thresh=0.0, num_classes=5)
    return cfg


@pytest.mark.parametrize("name", list(TWINS))
def test_lazy_config_trains_a_step_and_evaluates_on_cpu(tiny, tmp_path, name):
    _, names = tiny
    cfg = _on_tiny(load_lazy_cfg(LAZY.format(name)), names, str(tmp_path))
    with EventStorage(0):
        model, results = train(cfg)
    assert "bbox" in results and ("segm" in results) == name.startswith("mask_rcnn")
    record = lazy_result(cfg, LAZY.format(name), model, results, 1.0)
    assert (record["norm"], record["ims_per_batch"], record["max_iter"]) == ("FRN", 2, 1)


def _lazy_train_net(tiny, *overrides, flags=()):
    """tools/lazy_train_net.py on the tiny dataset: 3 iterations, evaluated after 2 and 3."""
    root, names = tiny
    data = [arg for split, name in names.items() for arg in
            ("--dataset", name, os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split))]
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "lazy_train_net.py"), *flags, "--config-file",
         LAZY.format("retinanet_R18_FPN_FRN_synthetic"), *data,
         f"dataloader.train.dataset.names={names['train']}", f"dataloader.test.dataset.names={names['val']}",
         "dataloader.train.num_workers=0", "dataloader.test.num_workers=0", "train.max_iter=3",
         "train.eval_period=2", "model.model.test_score_thresh=0.0", *overrides],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_this_checkout(proc.stdout + proc.stderr)
    return proc


def test_lazy_train_net_end_to_end_with_eval_only(tiny, tmp_path):
    out = tmp_path / "train"
    _lazy_train_net(tiny, f"train.output_dir={out}")
    result = json.loads((out / "frn_det_result.json").read_text())
    assert (result["norm"], result["meta_architecture"], result["max_iter"]) == ("FRN", "RetinaNet", 3)
    assert [c["iteration"] for c in result["curve"]] == [2, 3]
    again = tmp_path / "eval"
    _lazy_train_net(tiny, f"train.output_dir={again}", f"train.init_checkpoint={out / 'model_final.pth'}",
                    flags=["--eval-only"])
    assert json.loads((again / "frn_det_result.json").read_text())["results"] == result["results"]


def test_lazy_run_stopped_during_an_evaluation_evaluates_it_on_resume(tiny, tmp_path):
    """The checkpoint after iteration 2 is written, the evaluation due there is not: --resume
    evaluates it before training on, and the curve has both points, the resumed one with the
    uninterrupted run's value."""
    out = tmp_path / "train"
    _lazy_train_net(tiny, f"train.output_dir={out}", "train.checkpointer.period=2")
    full = json.loads((out / "frn_det_result.json").read_text())["curve"]
    os.remove(out / "model_final.pth")
    os.remove(out / "frn_det_result.json")
    with open(out / "metrics.json") as f:
        kept = [line for line in f if json.loads(line)["iteration"] < 1]
    (out / "metrics.json").write_text("".join(kept))
    (out / "last_checkpoint").write_text("model_0000001.pth")
    proc = _lazy_train_net(tiny, f"train.output_dir={out}", "train.checkpointer.period=2", flags=["--resume"])
    assert "Starting training from iteration 2" in proc.stdout + proc.stderr
    resumed = json.loads((out / "frn_det_result.json").read_text())["curve"]
    assert [c["iteration"] for c in resumed] == [c["iteration"] for c in full] == [2, 3]
    # the evaluated checkpoint is the uninterrupted run's; the iterations after it are not (the lazy
    # engine trains on detectron2's own loader, whose stream restarts on resume)
    assert resumed[0] == full[0] and full[0]["bbox"] > 0

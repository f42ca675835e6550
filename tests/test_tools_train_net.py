"""tools/train_net.py end to end on a tiny synthetic dataset (CPU), and tools/coco_eval.py.

Each run is a subprocess, as users run it; a few iterations on 64x64 images keep every run to
seconds. The score threshold is 0 so that an untrained model still produces detections to compare.
"""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

import frn_det  # noqa: F401
from frn_det.data import CLASSES
from frn_det.engine import coco_eval, default_argument_parser, run_cfg_from_args
from train_net_testing import dataset_args, run_opts, tiny_dataset, train_net

pytestmark = pytest.mark.slow  # subprocess runs (see tests/conftest.py: the fast tier is -m "not slow")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETINANET = os.path.join(REPO, "configs", "synthetic", "retinanet_R18_FPN_{}.yaml")
MASK_RCNN = os.path.join(REPO, "configs", "synthetic", "mask_rcnn_R18_FPN_GN.yaml")
CONTRACT_KEYS = {"config_file", "meta_architecture", "norm", "images_per_gpu", "num_gpus", "ims_per_batch", "seed",
                 "max_iter", "base_lr", "train_datasets", "test_datasets", "wall_time_s", "curve", "results", "by_dataset"}
METRICS = {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def coco_metrics(task_results):
    """COCO's six metrics, from a task's results beside its per-category "AP-<class>" ones."""
    return {k for k in task_results if not k.startswith("AP-")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    roots = {}
    for fmt in ("polygon", "rle"):
        root = str(tmp_path_factory.mktemp(fmt))
        tiny_dataset(root, num_train=6, num_val=3, mask_format=fmt)
        roots[fmt] = root
    return roots


def _result(out):
    with open(os.path.join(out, "frn_det_result.json")) as f:
        return json.load(f)


def _detections(out):
    with open(os.path.join(out, "inference", "coco_instances_results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """FRN RetinaNet, 4 iterations, evaluated after training."""
    out = tmp_path_factory.mktemp("train")
    train_net("--config-file", RETINANET.format("FRN"), *dataset_args(data["polygon"]), *run_opts(out))
    return out


def test_train_and_evaluate_writes_the_contract_result(trained):
    r = _result(trained)
    assert set(r) == CONTRACT_KEYS
    assert (r["meta_architecture"], r["norm"], r["num_gpus"], r["ims_per_batch"], r["images_per_gpu"]) == ("RetinaNet", "FRN", 1, 2, 2)
    assert (r["max_iter"], r["seed"], r["train_datasets"], r["test_datasets"]) == (4, 0, ["tiny_train"], ["tiny_val"])
    assert set(r["results"]) == {"bbox"} and coco_metrics(r["results"]["bbox"]) == METRICS
    assert {k for k in r["results"]["bbox"] if k.startswith("AP-")} == {f"AP-{c}" for c in CLASSES}
    assert r["by_dataset"] == {"tiny_val": {"results": r["results"], "curve": r["curve"]}}
    assert r["results"]["bbox"]["AP50"] is not None and r["wall_time_s"] > 0
    assert os.path.isfile(os.path.join(trained, "model_final.pth"))
    with open(os.path.join(trained, "metrics.json")) as f:
        metrics = [json.loads(line) for line in f]
    assert max(m["iteration"] for m in metrics if "total_loss" in m) == 3
    assert "bbox/AP" in metrics[-1]
    assert _detections(trained)


def test_eval_only_with_the_checkpoint_reproduces_the_result(data, trained, tmp_path):
    train_net("--config-file", RETINANET.format("FRN"), *dataset_args(data["polygon"]), "--eval-only",
              *run_opts(tmp_path), "MODEL.WEIGHTS", os.path.join(trained, "model_final.pth"))
    assert _result(tmp_path)["results"] == _result(trained)["results"]
    assert _detections(tmp_path) == _detections(trained)


def test_resume_continues_from_the_last_checkpoint(data, trained, tmp_path):
    # The state an interruption after iteration 2 leaves: checkpoint model_0000001 and no final model.
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    for name in ("model_final.pth", "model_0000003.pth", "frn_det_result.json"):
        if os.path.exists(out / name):
            os.remove(out / name)
    (out / "last_checkpoint").write_text("model_0000001.pth")
    proc = train_net("--config-file", RETINANET.format("FRN"), *dataset_args(data["polygon"]), "--resume", *run_opts(out))
    assert "Starting training from iteration 2" in proc.stdout + proc.stderr
    assert _result(out)["max_iter"] == 4
    assert os.path.isfile(out / "model_final.pth")


def test_two_process_cpu_gloo_training_and_evaluation(data, tmp_path):
    # GN: one image per process is a small batch for BN; GN's statistics do not depend on it.
    train_net("--config-file", RETINANET.format("GN"), *dataset_args(data["polygon"]), "--num-gpus", "2",
                     "--dist-url", "auto", *run_opts(tmp_path, max_iter=2), "MODEL.DEVICE", "cpu")
    r = _result(tmp_path)
    assert (r["num_gpus"], r["ims_per_batch"], r["images_per_gpu"]) == (2, 2, 1)
    assert coco_metrics(r["results"]["bbox"]) == METRICS
    # The evaluator gathered the detections of both processes: all 3 val images have some.
    assert {d["image_id"] for d in _detections(tmp_path)} == {1, 2, 3}
    with open(tmp_path / "log.txt.rank1") as f:  # detectron2's log of the second process
        assert "Rank of current process: 1. World size: 2" in f.read()


def test_rle_dataset_with_mask_rcnn_switches_to_bitmask(data, tmp_path):
    proc = train_net("--config-file", MASK_RCNN, *dataset_args(data["rle"], "rle"), *run_opts(tmp_path, 2, "rle"))
    assert "['rle_train'] have RLE masks: using INPUT.MASK_FORMAT bitmask" in proc.stdout + proc.stderr
    r = _result(tmp_path)
    assert r["meta_architecture"] == "GeneralizedRCNN" and set(r["results"]) == {"bbox", "segm"}


def test_malformed_dataset_json_fails_naming_the_file(data, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": ')
    proc = train_net("--config-file", RETINANET.format("GN"), "--dataset", "broken", str(bad), str(tmp_path),
                     *dataset_args(data["polygon"]), *run_opts(tmp_path / "out"), "DATASETS.TRAIN", "('broken',)", check=False)
    assert proc.returncode != 0
    assert f"dataset 'broken': {bad} is not valid JSON" in proc.stderr


def test_unknown_dataset_name_fails_before_training():
    args = default_argument_parser().parse_args(
        ["--config-file", RETINANET.format("BN"), "DATASETS.TEST", "('no_such_val',)"])
    with pytest.raises(ValueError, match=r"unknown dataset name\(s\) \['no_such_val'\] in DATASETS.TEST.*frn_synthetic_val"):
        run_cfg_from_args(args)


def test_coco_eval_matches_the_trainer_evaluation(data, trained, capsys):
    gt = os.path.join(data["polygon"], "annotations", "instances_val.json")
    stats = coco_eval.evaluate(gt, os.path.join(trained, "inference", "coco_instances_results.json"), "bbox")
    for k, v in _result(trained)["results"]["bbox"].items():
        assert stats[k] == pytest.approx(v, nan_ok=True) if v is not None else stats[k] != stats[k]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in capsys.readouterr().out


def test_coco_eval_errors_name_the_file(data, trained, tmp_path):
    gt = os.path.join(data["polygon"], "annotations", "instances_val.json")
    results = os.path.join(trained, "inference", "coco_instances_results.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    cases = [
        ([str(bad), results], f"ground-truth file {bad} is not valid JSON"),
        ([gt, str(bad)], f"results file {bad} is not valid JSON"),
        ([gt, str(tmp_path / "none.json")], "none.json does not exist"),
        ([gt, results, "--iou-type", "segm"], "lacks ['segmentation']"),
    ]
    tool = os.path.join(REPO, "tools", "coco_eval.py")
    for argv, message in cases:
        proc = subprocess.run([sys.executable, tool, *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr


# ---- exact resume -------------------------------------------------------------------------------

@pytest.mark.parametrize("config,workers", [(RETINANET.format("FRN"), 1), (MASK_RCNN, 0)], ids=["retinanet_FRN", "mask_rcnn_GN"])
def test_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(data, tmp_path, config, workers):
    """A run interrupted after iteration 2 (its checkpoint and log are all that is left) and resumed with
    --resume ends bitwise equal to the run that was not interrupted: the data stream continues where it
    stopped (a worker process maps the samples in the RetinaNet case, with random flips), and the
    random state of Mask R-CNN's proposal sampling is where the uninterrupted run had it."""
    import torch

    full = tmp_path / "full"
    opts = [*run_opts(full, max_iter=6), "DATALOADER.NUM_WORKERS", str(workers)]
    train_net("--config-file", config, *dataset_args(data["polygon"]), *opts)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for name in os.listdir(resumed):  # the state an interruption during iteration 3 leaves
        if name.endswith(".pth") and name != "model_0000001.pth" or name in ("frn_det_result.json", "inference"):
            shutil.rmtree(resumed / name) if (resumed / name).is_dir() else os.remove(resumed / name)
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    proc = train_net("--config-file", config, *dataset_args(data["polygon"]), "--resume",
                     *[str(resumed) if o == str(full) else o for o in opts])
    assert "Starting training from iteration 2" in proc.stdout + proc.stderr
    a = torch.load(full / "model_final.pth", weights_only=False)["model"]
    b = torch.load(resumed / "model_final.pth", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _result(resumed)["results"] == _result(full)["results"]


def test_run_interrupted_during_an_evaluation_evaluates_before_training_on(data, tmp_path):
    """detectron2 writes the checkpoint of an evaluation point before it evaluates: a run stopped during
    that evaluation resumes after it. The resumed run evaluates the checkpoint first, so its learning
    curve has every point of the uninterrupted run's (detectron2's writer flushes every 20 iterations:
    an evaluation every 20 keeps each on its own line)."""
    full = tmp_path / "full"
    opts = [*run_opts(full, max_iter=21), "TEST.EVAL_PERIOD", "20", "SOLVER.CHECKPOINT_PERIOD", "20"]
    train_net("--config-file", RETINANET.format("FRN"), *dataset_args(data["polygon"]), *opts)
    assert [p["iteration"] for p in _result(full)["curve"]] == [20, 21]
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for name in ("model_final.pth", "frn_det_result.json", "inference"):  # the state a stop during the evaluation leaves
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else os.remove(resumed / name)
    with open(full / "metrics.json") as f:
        (resumed / "metrics.json").write_text("".join(line for line in f if json.loads(line)["iteration"] < 19))
    (resumed / "last_checkpoint").write_text("model_0000019.pth")
    proc = train_net("--config-file", RETINANET.format("FRN"), *dataset_args(data["polygon"]), "--resume",
                     *[str(resumed) if o == str(full) else o for o in opts])
    assert "Starting training from iteration 20" in proc.stdout + proc.stderr
    assert "The evaluation after iteration 20 is not in metrics.json" in proc.stdout + proc.stderr
    assert _result(resumed)["curve"] == _result(full)["curve"]
    # stopped after that evaluation was written: it is not run again
    after = tmp_path / "after"
    shutil.copytree(full, after)
    for name in ("model_final.pth", "frn_det_result.json", "inference"):
        shutil.rmtree(after / name) if (after / name).is_dir() else os.remove(after / name)
    (after / "last_checkpoint").write_text("model_0000019.pth")
    proc = train_net("--config-file", RETINANET.format("FRN"), *dataset_args(data["polygon"]), "--resume",
                     *[str(after) if o == str(full) else o for o in opts])
    assert "is not in metrics.json" not in proc.stdout + proc.stderr
    assert _result(after)["curve"] == _result(full)["curve"]


# ---- bad input is named before training starts ----------------------------------------------------

def _args(*argv):
    return default_argument_parser().parse_args(["--config-file", RETINANET.format("FRN"), *argv])


@pytest.mark.parametrize("key,value", [("ACTIVATION", "GELU"), ("LEARNED_EPS", "some"), ("IMPL", "cuda"), ("EPS", -1.0)])
def test_invalid_frn_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"MODEL.FRN.{key}"):
        run_cfg_from_args(_args(f"MODEL.FRN.{key}", str(value)))


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"MODEL.WEIGHTS {tmp_path}/none.pth does not exist"):
        run_cfg_from_args(_args("MODEL.WEIGHTS", str(tmp_path / "none.pth")))


def test_batch_not_divisible_by_processes_fails_before_any_process_starts():
    from frn_det.engine import launch

    def main(args):
        raise AssertionError("no process should start")

    with pytest.raises(ValueError, match=r"SOLVER.IMS_PER_BATCH 2 .* not divisible by the 3 processes"):
        launch(main, _args("--num-gpus", "3", "MODEL.DEVICE", "cpu"))


def test_checkpoint_that_does_not_fit_names_the_tensors(trained, tmp_path):
    import torch
    from detectron2.modeling import build_model

    from frn_det.engine import ShapeCheckingCheckpointer, load_cfg

    checkpoint = torch.load(trained / "model_final.pth", weights_only=False)
    key = "backbone.bottom_up.res3.0.conv1.weight"
    checkpoint["model"][key] = torch.zeros(3, 3, 3, 3)
    bad = tmp_path / "misfit.pth"
    torch.save(checkpoint, bad)
    model = build_model(load_cfg(RETINANET.format("FRN")))
    with pytest.raises(ValueError, match=rf"does not fit this model: 1 tensors have other shapes \({key}: \(3, 3, 3, 3\)"):
        ShapeCheckingCheckpointer(model).load(str(bad))
    # another number of classes (the final predictor only) is fine-tuning: skipped with a warning, as in detectron2
    checkpoint["model"][key] = model.state_dict()[key]
    checkpoint["model"]["head.cls_score.weight"] = torch.zeros(18, 128, 3, 3)
    torch.save(checkpoint, bad)
    before = model.head.cls_score.weight.detach().clone()
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    checkpoint_logger = logging.getLogger("fvcore.common.checkpoint")  # detectron2's loggers need not propagate
    checkpoint_logger.addHandler(handler)
    try:
        ShapeCheckingCheckpointer(model).load(str(bad))
    finally:
        checkpoint_logger.removeHandler(handler)
    assert any("Skip loading parameter 'head.cls_score.weight'" in w and "(18, 128, 3, 3)" in w for w in warnings), warnings
    assert torch.equal(model.head.cls_score.weight, before)  # skipped, not loaded
    assert torch.equal(model.state_dict()[key], checkpoint["model"][key])  # the rest loaded

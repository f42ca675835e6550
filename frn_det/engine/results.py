"""The results contract of a run: OUTPUT_DIR/frn_det_result.json (docs/CONTRACTS.md)."""
import json
import logging
import math
import os

import detectron2.utils.comm as comm
from detectron2.engine import DefaultTrainer

from ..atomic import atomic_write

RESULT_FILE = "frn_det_result.json"
METRICS_FILE = "metrics.json"  # detectron2's JSONWriter
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TASKS = ("bbox", "segm")


def _finite_or_none(v):
    return None if v is None or math.isnan(v) else float(v)


def read_metrics(output_dir):
    """The records detectron2 wrote to OUTPUT_DIR/metrics.json, in file order (a line cut by an
    interruption or still being written is skipped); [] without the file."""
    return [record for _, record in _metrics_lines(output_dir)]


def _metrics_lines(output_dir):
    """``[(line, record)]`` of OUTPUT_DIR/metrics.json, without the lines that are not JSON records."""
    lines = []
    try:
        with open(os.path.join(output_dir, METRICS_FILE)) as f:
            for line in f:
                try:
                    lines.append((line, json.loads(line)))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return lines


def trim_metrics(output_dir, last_iteration):
    """Drops the records of OUTPUT_DIR/metrics.json after iteration ``last_iteration`` (and lines cut
    by a kill), so that a run resumed from that iteration's checkpoint does not record the iterations
    after it twice; the file is rewritten whole (:func:`frn_det.atomic.atomic_write`). Returns the
    number of lines dropped."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        total = sum(1 for _ in f)
    kept = [line if line.endswith("\n") else line + "\n" for line, record in _metrics_lines(output_dir)
            if int(record.get("iteration", -1)) <= last_iteration]
    if len(kept) < total:
        with atomic_write(path) as f:
            f.writelines(kept)
    return total - len(kept)


def read_curves(output_dir, max_iter, ims_per_batch):
    """The evaluations during training, from detectron2's OUTPUT_DIR/metrics.json: ``{dataset: curve}``
    (dataset "" when the run has one test dataset, whose keys detectron2 writes without its name), a
    curve being a list of {"iteration": iterations done, "images_seen", "bbox": AP, "segm": AP (mask
    models)}, one per evaluation (the last record of an iteration wins: a resumed run appends)."""
    points = {}
    for record in read_metrics(output_dir):
        done = min(int(record.get("iteration", -1)) + 1, max_iter)
        for key in record:
            if key == "bbox/AP" or key.endswith("/bbox/AP"):
                prefix = key[: -len("bbox/AP")]
                points.setdefault(prefix.rstrip("/"), {})[done] = {
                    "iteration": done, "images_seen": done * ims_per_batch,
                    **{t: _finite_or_none(record.get(f"{prefix}{t}/AP")) for t in TASKS if f"{prefix}{t}/AP" in record}}
    return {name: [p[k] for k in sorted(p)] for name, p in points.items()}


def read_curve(output_dir, max_iter, ims_per_batch, dataset=""):
    """One test dataset's curve (:func:`read_curves`); "" for a run with one test dataset."""
    return read_curves(output_dir, max_iter, ims_per_batch).get(dataset, [])


def _metrics(results):
    # every metric the evaluator returned: COCO's six, and the per-category "AP-<class>"
    return {task: {k: _finite_or_none(v) for k, v in metrics.items()} for task, metrics in results.items()}


def result_record(*, config_file, meta_architecture, norm, num_gpus, ims_per_batch, seed, max_iter, base_lr,
                  train_datasets, test_datasets, output_dir, results, wall_time_s):
    """The contract's dict; ``results`` is ``{test dataset: {task: {metric: AP}}}``: "results" and
    "curve" are the first test dataset's, "by_dataset" has each one's."""
    curves = read_curves(output_dir, max_iter, ims_per_batch)
    by_dataset = {name: {"results": _metrics(results.get(name, {})),
                         "curve": curves.get(name if len(test_datasets) > 1 else "", [])}
                  for name in test_datasets}
    first = by_dataset[test_datasets[0]] if test_datasets else {"results": {}, "curve": []}
    return {
        "config_file": config_file,
        "meta_architecture": meta_architecture,
        "norm": norm,
        "images_per_gpu": ims_per_batch // num_gpus,
        "num_gpus": num_gpus,
        "ims_per_batch": ims_per_batch,
        "seed": seed,
        "max_iter": max_iter,
        "base_lr": base_lr,
        "train_datasets": list(train_datasets),
        "test_datasets": list(test_datasets),
        "wall_time_s": round(wall_time_s, 1),
        "curve": first["curve"],
        "results": first["results"],
        "by_dataset": by_dataset,
    }


def make_result(cfg, config_file, results, wall_time_s):
    """The contract's dict for a yacs run (``results`` as detectron2 returns them: {task: ...} for one
    test dataset, {dataset: {task: ...}} for several)."""
    world = comm.get_world_size()
    scaled = DefaultTrainer.auto_scale_workers(cfg, world)  # what the trainer actually ran
    tests = list(cfg.DATASETS.TEST)
    by_dataset = results if len(tests) > 1 else {tests[0]: results} if tests else {}
    return result_record(
        config_file=config_file, meta_architecture=cfg.MODEL.META_ARCHITECTURE, norm=cfg.MODEL.RESNETS.NORM,
        num_gpus=world, ims_per_batch=scaled.SOLVER.IMS_PER_BATCH, seed=cfg.SEED, max_iter=scaled.SOLVER.MAX_ITER,
        base_lr=scaled.SOLVER.BASE_LR, train_datasets=cfg.DATASETS.TRAIN, test_datasets=tests,
        output_dir=cfg.OUTPUT_DIR, results=by_dataset, wall_time_s=wall_time_s)


def write_result(output_dir, record):
    """Write OUTPUT_DIR/frn_det_result.json (NaN APs as null); returns its path."""
    path = os.path.join(output_dir, RESULT_FILE)
    with atomic_write(path) as f:  # whole or absent: a kill during the write leaves no torn result
        json.dump(record, f, indent=2)
    logging.getLogger(__name__).info(f"Wrote {path}")
    return path


def read_result(run_dir):
    """The result dict of a run directory; FileNotFoundError / ValueError name the file."""
    path = os.path.join(run_dir, RESULT_FILE)
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e

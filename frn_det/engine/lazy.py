"""Training and evaluation of LazyConfigs (configs/lazy, detectron2's new_baselines and users' Python
configs): detectron2's tools/lazyconfig_train_net.py loop, with the FRN-aware optimizer the configs
name, checkpoints checked against the model and written whole, COCO evaluation during and after
training, CPU multi-process DDP, the yacs Trainer's exact resume and stop on SIGTERM / SIGINT
(frn_det.engine.preemption), and the results contract (OUTPUT_DIR/frn_det_result.json)."""
import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from torch import nn

from .. import kill_points
from ..data import ensure_coco_json
from ..layers import FilterResponseNorm2d
from .checkpoint import ShapeCheckingCheckpointer
from .preemption import StopOnSignal
from .results import result_record
from .resumable import EvaluateWhatTheInterruptionSkipped, continue_metrics, event_writers

logger = logging.getLogger(__name__)

# The norm name of a model's first norm layer, for the results contract.
_NORM_NAMES = {FilterResponseNorm2d: "FRN", nn.GroupNorm: "GN", nn.SyncBatchNorm: "SyncBN", nn.BatchNorm2d: "BN"}


def load_lazy_cfg(config_file, overrides=()):
    """LazyConfig.load + ``key=value`` overrides (detectron2's lazyconfig_train_net conventions)."""
    return LazyConfig.apply_overrides(LazyConfig.load(config_file), list(overrides))


def dataset_names(loader_cfg):
    names = loader_cfg.dataset.names
    return [names] if isinstance(names, str) else list(names)


def norm_of(model):
    for m in model.modules():
        for cls, name in _NORM_NAMES.items():
            if isinstance(m, cls):
                return name
        if type(m).__name__ == "FrozenBatchNorm2d":
            return "FrozenBN"
    return ""


def test(cfg, model):
    """COCO evaluation of ``model`` on cfg.dataloader.test (detectron2's do_test); {} without an evaluator."""
    if "evaluator" not in cfg.dataloader:
        return {}
    kill_points.reached_nth("evaluation", comm.get_rank())
    for name in dataset_names(cfg.dataloader.test):
        ensure_coco_json(name)  # a Pascal VOC dataset's ground truth, current (frn_det.data.voc)
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def _ddp(model, cfg):
    kwargs = dict(cfg.train.get("ddp", {}))
    if cfg.train.device == "cpu":
        kwargs["device_ids"] = None  # DistributedDataParallel rejects device ids for a CPU model
    return create_ddp_model(model, **kwargs)


def train(cfg, resume=False):
    """Train ``cfg`` (evaluating every train.eval_period and at the end); returns (model, final results)."""
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    model = _ddp(model, cfg)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, loader, optimizer)
    checkpointer = ShapeCheckingCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    last = {}

    def evaluate_and_keep():
        last["results"] = test(cfg, model)
        return last["results"]

    eval_hook = hooks.EvalHook(cfg.train.eval_period, evaluate_and_keep)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        StopOnSignal(checkpointer),
        eval_hook,
        EvaluateWhatTheInterruptionSkipped(eval_hook, cfg.train.output_dir),
        hooks.PeriodicWriter(event_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    if start_iter:
        continue_metrics(cfg.train.output_dir, start_iter)
    trainer.train(start_iter, cfg.train.max_iter)
    return model, last.get("results", {})  # EvalHook evaluates after the last iteration too


def evaluate(cfg):
    """Evaluate cfg.train.init_checkpoint (``--eval-only``)."""
    model = _ddp(instantiate(cfg.model).to(cfg.train.device), cfg)
    ShapeCheckingCheckpointer(model).load(cfg.train.init_checkpoint)
    return model, test(cfg, model)


def lazy_result(cfg, config_file, model, results, wall_time_s):
    """The results contract for a LazyConfig run."""
    model = model.module if hasattr(model, "module") else model
    return result_record(
        config_file=config_file, meta_architecture=type(model).__name__, norm=norm_of(model),
        num_gpus=comm.get_world_size(), ims_per_batch=cfg.dataloader.train.total_batch_size,
        seed=cfg.train.get("seed", -1), max_iter=cfg.train.max_iter, base_lr=cfg.optimizer.lr,
        train_datasets=dataset_names(cfg.dataloader.train), test_datasets=dataset_names(cfg.dataloader.test),
        output_dir=cfg.train.output_dir, results={dataset_names(cfg.dataloader.test)[0]: results},
        wall_time_s=wall_time_s)

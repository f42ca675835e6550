"""The trainer of frn-det runs: detectron2's DefaultTrainer with the FRN-aware optimizer, COCO
evaluation, and multi-process DDP on CPU."""
import contextlib
import functools
import os
from unittest import mock

import detectron2.utils.comm as comm
from detectron2.engine import DefaultTrainer, defaults
from detectron2.evaluation import COCOEvaluator

from ..modeling import build_optimizer


@contextlib.contextmanager
def _cpu_ddp(cfg):
    """DefaultTrainer wraps the model with ``create_ddp_model``, which passes device_ids=[local rank];
    DistributedDataParallel rejects device_ids for a CPU model. For MODEL.DEVICE cpu, pass None."""
    if cfg.MODEL.DEVICE != "cpu" or comm.get_world_size() == 1:
        yield
        return
    with mock.patch.object(defaults, "create_ddp_model", functools.partial(defaults.create_ddp_model, device_ids=None)):
        yield


class Trainer(DefaultTrainer):
    """DefaultTrainer with FRN/TLU parameters counted as norm parameters (SOLVER.WEIGHT_DECAY_NORM, as
    BN and GN get), COCO evaluation of boxes (and masks), and CPU multi-process training."""

    def __init__(self, cfg):
        with _cpu_ddp(cfg):
            super().__init__(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)

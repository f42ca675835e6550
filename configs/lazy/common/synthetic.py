"""The synthetic CPU task of configs/synthetic/*.yaml as LazyConfig parts: its datasets at 192 px,
R18 backbones, and `make demo`'s schedule."""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from .frn import frn_from_scratch, frn_sgd, step_schedule

SIZE = 192
NUM_CLASSES = 5


def r18_frn_backbone(backbone, fpn_channels=128):
    """An R18 bottom-up (BasicBlocks: no stride_in_1x1) with FRN, FPN of ``fpn_channels``."""
    frn_from_scratch(backbone)
    backbone.bottom_up.stages.depth = 18
    del backbone.bottom_up.stages.stride_in_1x1
    backbone.out_channels = fpn_channels
    return backbone


def dataloader(use_instance_mask):
    loader = model_zoo.get_config("common/data/coco.py").dataloader
    loader.train.dataset.names = "frn_synthetic_train"
    loader.train.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=(SIZE,), max_size=SIZE, sample_style="choice"),
        L(T.RandomFlip)(horizontal=True),
    ]
    loader.train.mapper.use_instance_mask = use_instance_mask
    loader.train.total_batch_size = 2
    loader.train.num_workers = 1
    loader.test.dataset.names = "frn_synthetic_val"
    loader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=SIZE, max_size=SIZE)]
    loader.test.num_workers = 1
    return loader


def cpu_training(lr, max_iter, steps, warmup_iters=200):
    """(optimizer, lr_multiplier, train) of a CPU schedule: the yacs twin's SOLVER.MAX_ITER / STEPS."""
    train = model_zoo.get_config("common/train.py").train
    train.update(init_checkpoint="", max_iter=max_iter, eval_period=max_iter // 4, device="cpu", seed=0)
    train.checkpointer.period = max_iter // 2
    return frn_sgd(lr=lr, weight_decay=1e-4), step_schedule(max_iter, steps, warmup_iters), train

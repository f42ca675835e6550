"""RetinaNet R50-FPN with FRN + TLU in backbone, FPN and head, trained from scratch on COCO: the
LazyConfig twin of configs/coco/retinanet_R_50_FPN/FRN_<IMAGES_PER_GPU>img.yaml (same model, schedule
and learning rate by the same linear rule; 8 GPUs)."""
from detectron2 import model_zoo

from .common.frn import SCRATCH_PIXEL_STD, frn_from_scratch, frn_sgd, placed, step_schedule, yacs_twin_solver

IMAGES_PER_GPU = 8  # 1, 2, 4, 8 or 16: the schedule of the yacs leaf with as many images per GPU
_solver = yacs_twin_solver(f"coco/retinanet_R_50_FPN/FRN_{IMAGES_PER_GPU}img.yaml")

_zoo_model = model_zoo.get_config("common/models/retinanet.py").model
frn_from_scratch(_zoo_model.backbone)
_zoo_model.head.norm = "FRN"
_zoo_model.pixel_std = SCRATCH_PIXEL_STD
model = placed(_zoo_model)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.total_batch_size = _solver.IMS_PER_BATCH
dataloader.train.mapper.use_instance_mask = False

optimizer = frn_sgd(lr=_solver.BASE_LR, weight_decay=_solver.WEIGHT_DECAY)
lr_multiplier = step_schedule(_solver.MAX_ITER, _solver.STEPS, _solver.WARMUP_ITERS)

train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = ""  # random initialisation
train.max_iter = _solver.MAX_ITER
train.checkpointer.period = _solver.CHECKPOINT_PERIOD
train.eval_period = _solver.CHECKPOINT_PERIOD * 5

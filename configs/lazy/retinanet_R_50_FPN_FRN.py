"""RetinaNet R50-FPN with FRN + TLU in backbone, FPN and head, trained from scratch on COCO: the
LazyConfig twin of configs/coco/retinanet_R_50_FPN/FRN_<IMAGES_PER_GPU>img.yaml (same model, schedule
and learning rate by the same linear rule; 8 GPUs)."""
from detectron2 import model_zoo

from frn_det.engine.config_grid import FAMILIES, scaled_schedule

from .common.frn import SCRATCH_PIXEL_STD, frn_from_scratch, frn_sgd, placed, step_schedule

IMAGES_PER_GPU = 8  # 1, 2, 4, 8 or 16: the schedule of the yacs leaf with as many images per GPU
schedule = scaled_schedule(FAMILIES["retinanet_R_50_FPN"], IMAGES_PER_GPU)

_zoo_model = model_zoo.get_config("common/models/retinanet.py").model
frn_from_scratch(_zoo_model.backbone)
_zoo_model.head.norm = "FRN"
_zoo_model.pixel_std = SCRATCH_PIXEL_STD
model = placed(_zoo_model)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.total_batch_size = schedule["IMS_PER_BATCH"]
dataloader.train.mapper.use_instance_mask = False

optimizer = frn_sgd(lr=schedule["BASE_LR"], weight_decay=float(FAMILIES["retinanet_R_50_FPN"]["weight_decay"]))
lr_multiplier = step_schedule(schedule["MAX_ITER"], schedule["STEPS"], schedule["WARMUP_ITERS"])

train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = ""  # random initialisation
train.max_iter = schedule["MAX_ITER"]
train.checkpointer.period = schedule["CHECKPOINT_PERIOD"]
train.eval_period = schedule["CHECKPOINT_PERIOD"] * 5

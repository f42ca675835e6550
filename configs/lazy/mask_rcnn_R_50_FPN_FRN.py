"""Mask R-CNN R50-FPN (4conv1fc box head) with FRN + TLU in backbone, FPN, box and mask heads, trained
from scratch on COCO: the LazyConfig twin of configs/coco/mask_rcnn_R_50_FPN/FRN_<IMAGES_PER_GPU>img.yaml
(same model, schedule and learning rate by the same linear rule; 8 GPUs)."""
from detectron2 import model_zoo

from frn_det.engine.config_grid import FAMILIES, scaled_schedule

from .common.frn import SCRATCH_PIXEL_STD, frn_from_scratch, frn_sgd, placed, step_schedule

IMAGES_PER_GPU = 8
schedule = scaled_schedule(FAMILIES["mask_rcnn_R_50_FPN"], IMAGES_PER_GPU)

_zoo_model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
frn_from_scratch(_zoo_model.backbone)
_zoo_model.roi_heads.box_head.conv_dims = [256] * 4
_zoo_model.roi_heads.box_head.fc_dims = [1024]
_zoo_model.roi_heads.box_head.conv_norm = "FRN"
_zoo_model.roi_heads.mask_head.conv_norm = "FRN"
_zoo_model.pixel_std = SCRATCH_PIXEL_STD
model = placed(_zoo_model)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.total_batch_size = schedule["IMS_PER_BATCH"]

optimizer = frn_sgd(lr=schedule["BASE_LR"], weight_decay=float(FAMILIES["mask_rcnn_R_50_FPN"]["weight_decay"]))
lr_multiplier = step_schedule(schedule["MAX_ITER"], schedule["STEPS"], schedule["WARMUP_ITERS"])

train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = ""
train.max_iter = schedule["MAX_ITER"]
train.checkpointer.period = schedule["CHECKPOINT_PERIOD"]
train.eval_period = schedule["CHECKPOINT_PERIOD"] * 5

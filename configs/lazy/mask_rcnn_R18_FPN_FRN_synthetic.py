"""Mask R-CNN R18-FPN with FRN + TLU from scratch on the synthetic CPU task (ROI sampling and heads cut
down for CPU): the LazyConfig twin of configs/synthetic/mask_rcnn_R18_FPN_FRN.yaml."""
from detectron2 import model_zoo
from detectron2.layers import ShapeSpec

from .common.frn import SCRATCH_PIXEL_STD, placed
from .common.synthetic import NUM_CLASSES, cpu_training, dataloader, r18_frn_backbone

_zoo_model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
r18_frn_backbone(_zoo_model.backbone)
_rpn = _zoo_model.proposal_generator
_rpn.head.in_channels = 128
_rpn.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
_rpn.update(pre_nms_topk=(600, 300), post_nms_topk=(200, 100), batch_size_per_image=128)
_roi = _zoo_model.roi_heads
_roi.update(num_classes=NUM_CLASSES, batch_size_per_image=64)
_roi.box_head.update(input_shape=ShapeSpec(channels=128, height=7, width=7), conv_dims=[128, 128], fc_dims=[256],
                     conv_norm="FRN")
_roi.box_predictor.update(input_shape=ShapeSpec(channels=256), test_score_thresh=0.0, test_topk_per_image=100)
_roi.mask_head.update(input_shape=ShapeSpec(channels=128, width=14, height=14), conv_dims=[128] * 3, conv_norm="FRN")
_zoo_model.pixel_std = SCRATCH_PIXEL_STD
model = placed(_zoo_model)

dataloader = dataloader(use_instance_mask=True)
optimizer, lr_multiplier, train = cpu_training(lr=0.02, max_iter=1400, steps=(1050, 1300))

"""RetinaNet R18-FPN (P3-P5) with FRN + TLU from scratch on the synthetic CPU task: the LazyConfig twin
of configs/synthetic/retinanet_R18_FPN_FRN.yaml."""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from .common.frn import SCRATCH_PIXEL_STD, placed
from .common.synthetic import NUM_CLASSES, cpu_training, dataloader, r18_frn_backbone

_zoo_model = model_zoo.get_config("common/models/retinanet.py").model
r18_frn_backbone(_zoo_model.backbone)
_zoo_model.backbone.top_block = L(LastLevelMaxPool)()  # P6 / P7 would be 3x3 / 2x2: the head uses P3-P5
_zoo_model.head.update(input_shape=[ShapeSpec(channels=128)] * 3, conv_dims=[128, 128], norm="FRN")
_zoo_model.anchor_generator.update(
    sizes=[[16.0, 20.16, 25.4], [32.0, 40.32, 50.8], [64.0, 80.63, 101.59]], strides=[8, 16, 32])
_zoo_model.update(num_classes=NUM_CLASSES, head_in_features=["p3", "p4", "p5"], test_score_thresh=0.0,
                  test_topk_candidates=100, max_detections_per_image=100, pixel_std=SCRATCH_PIXEL_STD)
model = placed(_zoo_model)

dataloader = dataloader(use_instance_mask=False)
optimizer, lr_multiplier, train = cpu_training(lr=0.01, max_iter=1900, steps=(1600, 1800))  # make demo's schedule

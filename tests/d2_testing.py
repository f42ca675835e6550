"""Shared helpers for the detectron2 integration tests: small stock model-zoo models on CPU."""
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model  # bound before `import frn_det`: the adapter must rebind it
from detectron2.structures import BitMasks, Boxes, Instances
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.nn import functional as F

import frn_det
from frn_det import TLU, FilterResponseNorm2d

RETINANET = "COCO-Detection/retinanet_R_50_FPN_1x.yaml"
MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
R18 = ("MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)
SIZE = 128


def make_cfg(config=RETINANET, norm="FRN", *opts, frn_config=True):
    """A stock model-zoo config with ``norm`` in all five places, 4conv1fc box head, from scratch, CPU."""
    cfg = get_cfg()
    if frn_config:
        frn_det.add_frn_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(config))
    cfg.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm, "MODEL.RETINANET.NORM", norm,
        "MODEL.ROI_BOX_HEAD.NORM", norm, "MODEL.ROI_MASK_HEAD.NORM", norm,
        "MODEL.ROI_BOX_HEAD.NUM_CONV", 4, "MODEL.ROI_BOX_HEAD.NUM_FC", 1,
        # keep CPU time down: fewer sampled ROIs in training, fewer proposals at test time
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
        *opts,
    ])
    return cfg


def build(config=RETINANET, norm="FRN", *opts, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(make_cfg(config, norm, *opts, **kwargs))


def images(n, seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) * 255 for _ in range(n)]


def batch(imgs, with_targets=False):
    """detectron2 model inputs; targets: two boxes per image with masks."""
    out = []
    for img in imgs:
        h, w = img.shape[1:]
        item = {"image": img, "height": h, "width": w}
        if with_targets:
            boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [50.0, 40.0, 120.0, 110.0]])
            masks = torch.zeros(2, h, w, dtype=torch.bool)
            for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
                m[y0:y1, x0:x1] = True
            inst = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([1, 7]), gt_masks=BitMasks(masks))
            item["instances"] = inst
        out.append(item)
    return out


STOCK_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d)


def frn_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FilterResponseNorm2d)]


def norm_params(model):
    """(name, param) of every FRN / TLU parameter."""
    return [(f"{n}.{pn}", p) for n, m in model.named_modules() if isinstance(m, (FilterResponseNorm2d, TLU))
            for pn, p in m.named_parameters(recurse=False)]


_RELUS = {torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class ReluAfterNorm(TorchFunctionMode):
    """Records every ReLU applied directly to the output of an FRN or TLU module during a forward.

    ``after_tlu`` lists modules ending in a TLU (FRN+TLU, TLU) whose output went through a ReLU;
    ``after_frn`` those of FRN without TLU; ``tlu_calls`` counts standalone TLU calls.
    """

    def __init__(self, model):
        super().__init__()
        self.model, self.outputs, self.after_tlu, self.after_frn, self.tlu_calls = model, [], [], [], 0

    def _hook(self, name, ends_in_tlu, standalone):
        def hook(module, inputs, output):
            self.outputs.append((output, name, ends_in_tlu))
            self.tlu_calls += standalone
        return hook

    def __enter__(self):
        self.handles = [
            m.register_forward_hook(self._hook(n, isinstance(m, TLU) or m.tau is not None, isinstance(m, TLU)))
            for n, m in self.model.named_modules() if isinstance(m, (FilterResponseNorm2d, TLU))
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELUS and args:
            for out, name, ends_in_tlu in self.outputs:
                if args[0] is out:
                    (self.after_tlu if ends_in_tlu else self.after_frn).append(name)
        return func(*args, **(kwargs or {}))

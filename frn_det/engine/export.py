"""Deploying FRN detectors the ways detectron2 users deploy: ONNX (detectron2's TracingAdapter and the
TorchScript-based exporter, frn_det::frn as standard ONNX operators) and TorchScript (tracing, or
scripting with detectron2's ``scripting_with_instances``), each checked against the PyTorch model.

The interface follows detectron2's tools/deploy/export_model.py (tools/export_model.py here).
"""
import os

import numpy as np
import torch
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes
from detectron2.utils.testing import convert_scripted_instances

# Exported ONNX opset: detectron2's stable one where it suffices, raised for Mask R-CNN's GridSample.
ONNX_OPSET = {"RetinaNet": 11, "GeneralizedRCNN": 16}


def sample_image(cfg, path=None):
    """(CHW float image in cfg.INPUT.FORMAT, its path) to trace and check with: ``path``, else the
    first image of the config's first test dataset (a synthetic one generated on first use)."""
    from detectron2.data import DatasetCatalog, detection_utils

    from ..data import ensure_synthetic

    if path is None:
        ensure_synthetic(cfg.DATASETS.TEST)
        path = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"]
    image = detection_utils.read_image(path, format=cfg.INPUT.FORMAT)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1)), path


def _inference_fn(model):
    if isinstance(model, GeneralizedRCNN):
        def inference(model, inputs):  # ROI masks, not pasted: what detectron2's export does
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]
        return inference
    return None  # call the model directly


def tracing_adapter(model, image):
    """detectron2's TracingAdapter around ``model`` (in eval mode) for one CHW image."""
    return TracingAdapter(model, [{"image": image}], _inference_fn(model)).eval()


def export_onnx(model, image, path):
    """ONNX through the TorchScript-based exporter; returns the adapter (its outputs are the reference)."""
    adapter = tracing_adapter(model, image)
    opset = ONNX_OPSET[type(model).__name__] if type(model).__name__ in ONNX_OPSET else 16
    with open(path, "wb") as f:
        torch.onnx.export(adapter, (image,), f, opset_version=opset, dynamo=False)
    return adapter


def export_torchscript_tracing(model, image, path):
    adapter = tracing_adapter(model, image)
    traced = torch.jit.trace(adapter, (image,))
    traced.save(path)
    return adapter


def export_torchscript_scripting(model, path):
    fields = {"pred_boxes": Boxes, "scores": torch.Tensor, "pred_classes": torch.Tensor}
    if isinstance(model, GeneralizedRCNN):  # the proposals' fields too
        fields.update(proposal_boxes=Boxes, objectness_logits=torch.Tensor)
        if getattr(model.roi_heads, "mask_on", False):
            fields["pred_masks"] = torch.Tensor
    scripted = scripting_with_instances(model, fields)
    scripted.save(path)
    return scripted


def run_onnx(path, image):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, {session.get_inputs()[0].name: image.numpy()})]


# How far an exported model's outputs may be from PyTorch's, relative to each output's magnitude
# (boxes in pixels and scores near 0.01 alike): ONNX runtime kernels round differently; TorchScript
# runs PyTorch's own kernels, so it must be exact.
RELATIVE_TOLERANCE = {"onnx": 1e-4, "torchscript": 0.0}


def compare_outputs(expected, got):
    """{"outputs": n, "shapes_equal": bool, "relative_diffs": [per output: max |a - b| / max |a|],
    "max_abs_diff": d} for two lists of tensors (an output that is all zeros: its absolute difference)."""
    shapes = len(expected) == len(got) and all(tuple(a.shape) == tuple(b.shape) for a, b in zip(expected, got))
    if not shapes:
        return {"outputs": len(expected), "shapes_equal": False, "relative_diffs": [], "max_abs_diff": float("inf")}
    diffs = [float((a.double() - b.double()).abs().max()) if a.numel() else 0.0 for a, b in zip(expected, got)]
    scales = [float(a.double().abs().max()) if a.numel() else 0.0 for a in expected]
    relative = [d / s if s > 0 else d for d, s in zip(diffs, scales)]
    return {"outputs": len(expected), "shapes_equal": True, "relative_diffs": relative, "max_abs_diff": max(diffs, default=0.0)}


def compare_instances(expected, got):
    """Detections of two runs: count, classes, and the largest box and score differences."""
    a, b = expected.to("cpu"), got.to("cpu")
    same = len(a) == len(b) and torch.equal(a.pred_classes, b.pred_classes)
    box_diff = float((a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max()) if same and len(a) else 0.0
    score_diff = float((a.scores - b.scores).abs().max()) if same and len(a) else 0.0
    return {"detections": len(a), "same_classes": same, "max_box_diff": box_diff, "max_score_diff": score_diff}


def export_and_check(model, image, fmt, method, output_dir):
    """Export ``model`` (eval mode) for ``image`` and check the exported model's outputs against
    PyTorch's. Returns (path, report dict with "ok")."""
    os.makedirs(output_dir, exist_ok=True)
    model.eval()
    with torch.no_grad():
        if method == "scripting":
            if fmt != "torchscript":
                raise ValueError("--export-method scripting produces TorchScript only: use --format torchscript")
            path = os.path.join(output_dir, "model.ts")
            scripted = export_torchscript_scripting(model, path)
            inputs = [{"image": image}]
            if isinstance(model, GeneralizedRCNN):  # scripted R-CNNs cannot postprocess (detectron2)
                expected = model.inference(inputs, do_postprocess=False)[0]
                got = scripted.inference(inputs, do_postprocess=False)[0]
            else:  # a scripted dense detector returns unprocessed Instances: postprocess as eager does
                expected = model(inputs)[0]["instances"]
                got = detector_postprocess(convert_scripted_instances(scripted(inputs)[0]), *image.shape[1:])
            report = compare_instances(expected, got)
            report["ok"] = report["same_classes"] and report["max_box_diff"] == report["max_score_diff"] == 0.0
            return path, report
        expected = list(tracing_adapter(model, image)(image))
        if fmt == "onnx":
            path = os.path.join(output_dir, "model.onnx")
            export_onnx(model, image, path)
            got = run_onnx(path, image)
        else:
            path = os.path.join(output_dir, "model.ts")
            export_torchscript_tracing(model, image, path)
            got = list(torch.jit.load(path)(image))
        report = compare_outputs(expected, got)
        report["ok"] = report["shapes_equal"] and all(r <= RELATIVE_TOLERANCE[fmt] for r in report["relative_diffs"])
        return path, report


def features_onnx_check(backbone, image_batch, path):
    """Export a backbone to ONNX, run it in onnxruntime; max relative difference of its features."""
    names = list(backbone.output_shape())
    with open(path, "wb") as f:
        torch.onnx.export(_FeatureList(backbone, names), (image_batch,), f, opset_version=11, dynamo=False)
    with torch.no_grad():
        expected = _FeatureList(backbone, names)(image_batch)
    got = run_onnx(path, image_batch)
    return max(float((e - g).abs().max() / e.abs().max().clamp_min(1e-12)) for e, g in zip(expected, got))


class _FeatureList(torch.nn.Module):
    def __init__(self, backbone, names):
        super().__init__()
        self.backbone, self.names = backbone, names

    def forward(self, x):
        features = self.backbone(x)
        return [features[n] for n in self.names]

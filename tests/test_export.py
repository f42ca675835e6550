"""Deployment: FRN layers script and trace; frn_det::frn exports to ONNX as standard operators through
both exporters; FRN detectors export like BN detectors (detectron2's TracingAdapter + ONNX, TorchScript
tracing and scripting) and the exported models match PyTorch; torch.export of an FRN backbone."""
import os
import subprocess
import sys

import onnx
import onnxruntime
import pytest
import torch
from detectron2.modeling import build_model
from frn_testing import impl_params
from PIL import Image

from frn_det.engine import load_cfg
from frn_det.engine.export import export_and_check, features_onnx_check, sample_image
from frn_det.layers import TLU, FilterResponseNorm2d
from frn_det.layers.onnx_export import translation_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic", "{}_R18_FPN_FRN.yaml")
IMPLS = impl_params()


def _frn_stack(impl):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), FilterResponseNorm2d(8, learned_eps=True, impl=impl), TLU(8),
                            torch.nn.Conv2d(8, 4, 1), FilterResponseNorm2d(4, tlu=False, impl=impl)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() <= 1:
                p.uniform_(-0.3, 0.3) if p.dim() == 1 else p.fill_(0.01)
    return m


@pytest.mark.parametrize("impl", IMPLS)
def test_layers_script_and_trace(impl):
    x = torch.randn(2, 3, 9, 11)
    m = _frn_stack(impl)
    expected = m(x)
    for module in (m[1], m[2], m[4]):
        torch.jit.script(module)
    for converted in (torch.jit.script(m), torch.jit.trace(m, x)):
        assert torch.equal(converted(x), expected)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
@pytest.mark.parametrize("impl", IMPLS)
def test_onnx_export_uses_standard_operators_and_matches(tmp_path, impl, dynamo):
    m = _frn_stack(impl)
    x = torch.randn(2, 3, 10, 12)
    path = str(tmp_path / "m.onnx")
    kwargs = {"custom_translation_table": translation_table()} if dynamo else {"opset_version": 17}
    torch.onnx.export(m, (x,), path, dynamo=dynamo, **kwargs)
    graph = onnx.load(path).graph
    assert {n.domain for n in graph.node} <= {""}, "no custom ONNX domain"
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), m(x).detach(), atol=1e-5, rtol=1e-4)


def _first_val_image_rgb():
    """frn_synthetic_val's first image (RGB), rendered without generating the set."""
    from frn_det.data.synthetic import SyntheticSpec, render_image

    return render_image(SyntheticSpec(), "val", 0)[0]


@pytest.fixture(scope="module")
def val_image():
    """That image as detectron2 reads it: BGR, CHW float."""
    return torch.as_tensor(_first_val_image_rgb()[:, :, ::-1].astype("float32").transpose(2, 0, 1).copy())


def _model(family):
    torch.manual_seed(0)
    return build_model(load_cfg(CONFIG.format(family))).eval()


@pytest.mark.parametrize("family,fmt,method", [
    ("retinanet", "onnx", "tracing"), ("mask_rcnn", "onnx", "tracing"), ("retinanet", "torchscript", "tracing"),
    ("retinanet", "torchscript", "scripting"), ("mask_rcnn", "torchscript", "scripting")])
def test_frn_detectors_export_and_match_pytorch(tmp_path, val_image, family, fmt, method):
    path, report = export_and_check(_model(family), val_image, fmt, method, str(tmp_path))
    assert os.path.isfile(path) and report["ok"], report
    if "detections" in report:  # scripted: PyTorch's kernels, bitwise
        assert report["detections"] > 0 and report["max_box_diff"] == report["max_score_diff"] == 0.0
    else:  # each output (boxes, scores, classes, masks) to its own magnitude: ~1e-4 for ONNX, exact traced
        assert report["outputs"] >= 3 and len(report["relative_diffs"]) == report["outputs"]
        assert max(report["relative_diffs"]) <= (1e-4 if fmt == "onnx" else 0.0), report


def test_backbone_features_match_in_onnxruntime(tmp_path, val_image):
    model = _model("retinanet")
    images = model.preprocess_image([{"image": val_image}]).tensor
    assert features_onnx_check(model.backbone, images, str(tmp_path / "backbone.onnx")) < 1e-4


def test_torch_export_of_an_frn_backbone_equals_eager():
    backbone = _model("retinanet").backbone
    x = torch.randn(1, 3, 192, 192)
    exported = torch.export.export(backbone, (x,))
    expected, got = backbone(x), exported.module()(x)
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-5)


def test_export_model_tool_checks_and_says_so(tmp_path):
    image = tmp_path / "val_000000.png"
    Image.fromarray(_first_val_image_rgb()).save(image)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_model.py"), "--config-file",
                           CONFIG.format("retinanet"), "--format", "onnx", "--sample-image", str(image),
                           "--output", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"on {image} it matches PyTorch" in proc.stdout and os.path.isfile(tmp_path / "model.onnx")
    bad = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_model.py"), "--config-file",
                          CONFIG.format("retinanet"), "--format", "onnx", "--export-method", "scripting",
                          "--sample-image", str(image), "--output", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "scripting produces TorchScript only" in bad.stderr


def test_sample_image_defaults_to_the_first_image_of_the_first_test_set(tmp_path, val_image):
    """Without --sample-image: the first test dataset's first image, read in the config's format."""
    from detectron2.data.datasets import register_coco_instances

    from frn_det.data.synthetic import SyntheticSpec, generate

    root = tmp_path / "data"
    generate(SyntheticSpec(num_train=1, num_val=2), str(root), progress=False)
    register_coco_instances("export_sample_val", {}, str(root / "annotations" / "instances_val.json"), str(root / "val"))
    cfg = load_cfg(CONFIG.format("retinanet"), ["DATASETS.TEST", "('export_sample_val',)"])
    image, path = sample_image(cfg)
    assert os.path.basename(path) == "000000.png" and path.startswith(str(root))
    assert torch.equal(image, val_image)  # the same first val image as the default set's, BGR


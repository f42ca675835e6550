#!/usr/bin/env python
"""Export an FRN (or any) detectron2 model to ONNX or TorchScript, and check the exported model's
outputs against PyTorch's on the sample image. detectron2's tools/deploy/export_model.py interface:

    python tools/export_model.py --config-file configs/synthetic/retinanet_R18_FPN_FRN.yaml \\
        --format onnx --export-method tracing --output output/export MODEL.WEIGHTS output/demo/FRN/model_final.pth
    python tools/export_model.py --config-file ... --format torchscript --export-method scripting --output ...

--sample-image IMAGE (any image file; default: the first image of the config's first test dataset,
e.g. a synthetic val image). ONNX goes through the TorchScript-based exporter with detectron2's
TracingAdapter; frn_det::frn becomes standard ONNX operators. Exits 1 when the check fails.
The logic is frn_det/engine/export.py.
"""
import argparse
import json
import sys

from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from frn_det.engine import ShapeCheckingCheckpointer, load_run_cfg
from frn_det.engine.export import export_and_check, sample_image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    parser.add_argument("--export-method", choices=["tracing", "scripting"], default="tracing")
    parser.add_argument("--sample-image", default=None, help="image to trace and check with")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides (e.g. MODEL.WEIGHTS)")
    args = parser.parse_args(argv)

    cfg = load_run_cfg(args.config_file, ["MODEL.DEVICE", "cpu", *args.opts])
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)  # what initialises what MODEL.WEIGHTS does not set
    model = build_model(cfg)
    ShapeCheckingCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    image, image_path = sample_image(cfg, args.sample_image)
    try:
        path, report = export_and_check(model, image, args.format, args.export_method, args.output)
    except ValueError as e:
        parser.error(str(e))
    verdict = "matches PyTorch" if report["ok"] else "DOES NOT match PyTorch"
    print(f"exported {path} ({args.format}, {args.export_method}); on {image_path} it {verdict}: {json.dumps(report)}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

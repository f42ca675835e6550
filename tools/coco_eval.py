#!/usr/bin/env python
"""Evaluate saved COCO-format detections against COCO ground truth with pycocotools.

    python tools/coco_eval.py datasets/frn_synthetic/annotations/instances_val.json \\
        output/demo/FRN/inference/coco_instances_results.json --iou-type bbox

The results file is what detectron2's COCOEvaluator writes (OUTPUT_DIR/inference/
coco_instances_results.json): a list of {"image_id", "category_id", "score", "bbox" or
"segmentation"}. Prints pycocotools' standard table and the per-category AP.
"""
import argparse
import sys

from frn_det.engine.coco_eval import EvalInputError, evaluate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ground_truth", help="COCO instances json (ground truth)")
    parser.add_argument("results", help="COCO results json (list of detections)")
    parser.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    args = parser.parse_args(argv)
    try:
        evaluate(args.ground_truth, args.results, args.iou_type)
    except EvalInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

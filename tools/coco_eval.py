#!/usr/bin/env python
"""Evaluate saved COCO-format detections against COCO ground truth with pycocotools.

    python tools/coco_eval.py datasets/frn_synthetic/annotations/instances_val.json \\
        output/demo/FRN/inference/coco_instances_results.json --iou-type bbox

The results file is what detectron2's COCOEvaluator writes (OUTPUT_DIR/inference/
coco_instances_results.json): a list of {"image_id", "category_id", "score", "bbox" or
"segmentation"}. Prints pycocotools' standard table and the per-category AP.

--errors adds, per results file, the class-agnostic AP, what each ground-truth class is detected
as (finding objects vs naming them) and each class's AP on the smallest quarter, middle half and
largest quarter of the objects (by the dataset's area quartiles, and by each class's own); --plot draws the confusion matrices side by side, one per results file:

    python tools/coco_eval.py GT.json gn/inference/coco_instances_results.json \\
        frn/inference/coco_instances_results.json --errors --labels GN FRN --plot confusion.png
"""
import argparse
import sys

from frn_det.engine.coco_eval import (
    EvalInputError,
    error_analysis,
    evaluate,
    format_ap_by_class_size,
    format_ap_by_size,
    format_confusion,
    plot_confusions,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ground_truth", help="COCO instances json (ground truth)")
    parser.add_argument("results", nargs="+", help="COCO results json (list of detections); several with --errors")
    parser.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    parser.add_argument("--errors", action="store_true", help="class-agnostic AP and the class confusion")
    parser.add_argument("--score-thresh", type=float, default=0.3, help="detections counted in the confusion")
    parser.add_argument("--labels", nargs="+", help="a name per results file (default: the paths)")
    parser.add_argument("--plot", help="PNG of the confusion matrices (with --errors)")
    args = parser.parse_args(argv)
    labels = args.labels or args.results
    if len(labels) != len(args.results):
        parser.error(f"--labels names {len(labels)} results files, {len(args.results)} given")
    if (len(args.results) > 1 or args.plot) and not args.errors:
        parser.error("several results files and --plot need --errors")
    try:
        if not args.errors:
            evaluate(args.ground_truth, args.results[0], args.iou_type)
            return 0
        analyses = [error_analysis(args.ground_truth, r, args.iou_type, args.score_thresh) for r in args.results]
    except EvalInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for label, a in zip(labels, analyses):
        print(f"\n{label}: AP {a['AP']:.2f}, class-agnostic AP {a['class_agnostic_AP']:.2f}\n")
        print(format_confusion(a))
        print(f"\nAP by object size (quartiles of the ground truth's areas):\n\n{format_ap_by_size(a)}")
        print(f"\nAP by object size within each class (its own area quartiles):\n\n{format_ap_by_class_size(a)}")
    if args.plot:
        plot_confusions(analyses, labels, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

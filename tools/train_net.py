#!/usr/bin/env python
"""Train and evaluate detectron2 models with FRN (and the BN / GN baselines).

detectron2's tools/train_net.py conventions (--config-file, --num-gpus, --num-machines,
--machine-rank, --dist-url, --resume, --eval-only, trailing KEY VALUE overrides), plus:
- `import frn_det` registers the norm name "FRN", the synthetic datasets and BCCD (bccd_train, ...);
  configs get MODEL.FRN.* and the optimizer counts FRN parameters as norm parameters (frn_det.engine.Trainer);
- `--dataset NAME JSON IMAGE_ROOT` (repeatable) registers a COCO-format dataset, polygon or RLE
  masks (RLE switches INPUT.MASK_FORMAT to bitmask for mask models); `--voc-dataset NAME DIR SPLIT`
  (repeatable) a split of a Pascal VOC folder, its classes from `--voc-classes` or its xml files;
- before the first iteration (and before --eval-only evaluates), the heads' numbers of classes are
  checked against the datasets' categories, and the image files per DATASETS.CHECK_IMAGES ("headers"
  by default); `--check-data-only` runs only these checks (every pixel of every image, unless the
  overrides set DATASETS.CHECK_IMAGES) and exits;
- the final evaluation is also written to OUTPUT_DIR/frn_det_result.json (docs/CONTRACTS.md);
- `--num-gpus N MODEL.DEVICE cpu` trains with N CPU processes (gloo).

Examples:
    python tools/train_net.py --config-file configs/synthetic/retinanet_R18_FPN_FRN.yaml
    python tools/train_net.py --config-file configs/bccd/retinanet_R18_FPN_GN.yaml --num-gpus 2 MODEL.DEVICE cpu
    python tools/train_net.py --config-file configs/synthetic/retinanet_R18_FPN_FRN.yaml \\
        --eval-only MODEL.WEIGHTS output/retinanet_R18_FPN_FRN/model_final.pth
    python tools/train_net.py --config-file configs/synthetic/mask_rcnn_R18_FPN_GN.yaml \\
        --dataset shapes_train data/train.json data/train --dataset shapes_val data/val.json data/val \\
        DATASETS.TRAIN '("shapes_train",)' DATASETS.TEST '("shapes_val",)'
    python tools/train_net.py --config-file configs/bccd/retinanet_R18_FPN_FRN.yaml \\
        --voc-dataset cells_train data/VOC trainval --voc-dataset cells_test data/VOC test \\
        DATASETS.TRAIN '("cells_train",)' DATASETS.TEST '("cells_test",)' MODEL.RETINANET.NUM_CLASSES 5
    python tools/train_net.py --config-file ... --dataset shapes_train data/train.json data/train \\
        --check-data-only DATASETS.TRAIN '("shapes_train",)'  # options before the KEY VALUE overrides
Real COCO: detectron2's coco_2017_train / coco_2017_val, found under $DETECTRON2_DATASETS/coco.
"""
import time

import detectron2.utils.comm as comm
from detectron2.evaluation import verify_results

from frn_det.data import ensure_synthetic
from frn_det.engine import (
    ShapeCheckingCheckpointer,
    Trainer,
    default_setup,
    launch,
    make_result,
    run_cfg_from_args,
    train_argument_parser,
    write_result,
)


def setup(args):
    cfg = run_cfg_from_args(args)
    default_setup(cfg, args)
    return cfg


def main(args):
    start = time.perf_counter()
    cfg = setup(args)
    if comm.is_main_process():
        ensure_synthetic(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    comm.synchronize()

    if args.check_data_only:
        Trainer.check_data_only(cfg, args.opts)
        return {}
    if args.eval_only:
        Trainer.check_data(cfg, train=False)
        model = Trainer.build_model(cfg)
        ShapeCheckingCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        # EvalHook evaluates after the last iteration even with TEST.EVAL_PERIOD 0.
        results = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process() and results:
        verify_results(cfg, results)
        write_result(cfg.OUTPUT_DIR, make_result(cfg, args.config_file, results, time.perf_counter() - start))
    return results


if __name__ == "__main__":
    args = train_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args)

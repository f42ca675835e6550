#!/usr/bin/env python
"""Train and evaluate detectron2 LazyConfigs (Python configs) with FRN: detectron2's
tools/lazyconfig_train_net.py conventions (--config-file, --eval-only, --resume, --num-gpus,
--num-machines, --machine-rank, --dist-url, trailing key=value overrides), plus --dataset NAME JSON
IMAGE_ROOT (COCO json), --voc-dataset NAME DIR SPLIT (Pascal VOC folder) and OUTPUT_DIR/frn_det_result.json. The configs of configs/lazy instantiate their models
with the paper's FRN placement and the FRN-aware optimizer.

    python tools/lazy_train_net.py --config-file configs/lazy/retinanet_R18_FPN_FRN_synthetic.py
    python tools/lazy_train_net.py --config-file configs/lazy/retinanet_R_50_FPN_FRN.py --num-gpus 8 \\
        train.output_dir=output/lazy_frn
    python tools/lazy_train_net.py --config-file ... --eval-only train.init_checkpoint=output/.../model_final.pth
"""
import time

from detectron2.utils import comm

from frn_det.data import ensure_synthetic
from frn_det.engine import default_argument_parser, default_setup, launch
from frn_det.engine.launch import register_datasets
from frn_det.engine.lazy import dataset_names, evaluate, lazy_result, load_lazy_cfg, train
from frn_det.engine.results import write_result


def main(args):
    start = time.perf_counter()
    register_datasets(args)
    cfg = load_lazy_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    if comm.is_main_process():
        ensure_synthetic(dataset_names(cfg.dataloader.train) + dataset_names(cfg.dataloader.test))
    comm.synchronize()
    model, results = evaluate(cfg) if args.eval_only else train(cfg, resume=args.resume)
    if comm.is_main_process() and results:
        write_result(cfg.train.output_dir, lazy_result(cfg, args.config_file, model, results, time.perf_counter() - start))
    return results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args)

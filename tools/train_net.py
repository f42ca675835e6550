#!/usr/bin/env python
"""Train and evaluate detectron2 models with FRN (and the BN / GN baselines).

detectron2's tools/train_net.py conventions, plus:
- `import frn_det` registers the norm name "FRN" and the synthetic datasets, `add_frn_config` adds
  MODEL.FRN.*, and the optimizer counts FRN parameters as norm parameters;
- `--dataset NAME JSON IMAGE_ROOT` (repeatable) registers a COCO-format dataset, polygon or RLE
  masks (RLE switches INPUT.MASK_FORMAT to bitmask for mask models);
- the final evaluation is also written to OUTPUT_DIR/frn_det_result.json (docs/CONTRACTS.md);
- `--num-gpus N MODEL.DEVICE cpu` trains with N CPU processes (gloo).

Examples:
    python tools/train_net.py --config-file configs/synthetic/retinanet_R18_FPN_FRN.yaml
    python tools/train_net.py --config-file configs/synthetic/retinanet_R18_FPN_GN.yaml \\
        --num-gpus 2 OUTPUT_DIR output/gn_2proc
    python tools/train_net.py --config-file configs/synthetic/retinanet_R18_FPN_FRN.yaml \\
        --eval-only MODEL.WEIGHTS output/retinanet_R18_FPN_FRN/model_final.pth
    python tools/train_net.py --config-file configs/synthetic/mask_rcnn_R18_FPN_GN.yaml \\
        --dataset shapes_train data/train.json data/train --dataset shapes_val data/val.json data/val \\
        DATASETS.TRAIN '("shapes_train",)' DATASETS.TEST '("shapes_val",)'
Real COCO: detectron2's coco_2017_train / coco_2017_val, found under $DETECTRON2_DATASETS/coco.
"""
import json
import logging
import math
import os
import sys
import time
import weakref

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import detectron2.utils.comm as comm  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import (  # noqa: E402
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.evaluation import COCOEvaluator, verify_results  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from frn_det import add_frn_config  # noqa: E402
from frn_det.data import check_registered, ensure_synthetic, register_coco_dataset, uses_rle_masks  # noqa: E402
from frn_det.optimizer import FRNTrainerMixin  # noqa: E402

RESULT_FILE = "frn_det_result.json"
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class Trainer(FRNTrainerMixin, DefaultTrainer):
    """DefaultTrainer with the FRN-aware optimizer (the mixin), COCO evaluation and CPU multi-process DDP."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, except for the DDP wrapper: create_ddp_model passes
        # device_ids=[local rank], which DistributedDataParallel rejects for a CPU model.
        super(DefaultTrainer, self).__init__()
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        device_ids = None if cfg.MODEL.DEVICE == "cpu" else [comm.get_local_rank()]
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=device_ids)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)


def add_dataset_argument(parser):
    parser.add_argument(
        "--dataset", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset (polygon or RLE masks) under NAME; repeatable. "
        "Use it with DATASETS.TRAIN / DATASETS.TEST overrides.",
    )
    return parser


def build_cfg(args):
    """(frozen config, notes to log), with user datasets registered; nothing is written."""
    for name, json_file, image_root in args.dataset:
        register_coco_dataset(name, json_file, image_root)
    notes = []
    cfg = get_cfg()
    add_frn_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    check_registered(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    check_registered(cfg.DATASETS.TEST, "DATASETS.TEST")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available: add `MODEL.DEVICE cpu`")
    if cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT == "polygon":
        rle = [n for n in cfg.DATASETS.TRAIN if uses_rle_masks(n)]
        if rle:
            # detectron2 otherwise fails in a data-loader worker with "Failed to use mask_format=='polygon'".
            cfg.INPUT.MASK_FORMAT = "bitmask"
            notes.append(f"{rle} have RLE masks: using INPUT.MASK_FORMAT bitmask")
    cfg.freeze()
    return cfg, notes


def setup(args):
    cfg, notes = build_cfg(args)
    default_setup(cfg, args)
    logger = setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="frn_det")
    for note in notes:
        logger.warning(note)
    return cfg


def _finite_or_none(v):
    return None if v is None or math.isnan(v) else float(v)


def write_result(cfg, args, results, wall_time_s):
    """OUTPUT_DIR/frn_det_result.json as specified in docs/CONTRACTS.md (NaN APs written as null)."""
    world = comm.get_world_size()
    scaled = DefaultTrainer.auto_scale_workers(cfg, world)  # what the trainer actually ran
    if len(cfg.DATASETS.TEST) > 1:
        results = results[cfg.DATASETS.TEST[0]]
    result = {
        "config_file": args.config_file,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "norm": cfg.MODEL.RESNETS.NORM,
        "images_per_gpu": scaled.SOLVER.IMS_PER_BATCH // world,
        "num_gpus": world,
        "ims_per_batch": scaled.SOLVER.IMS_PER_BATCH,
        "seed": cfg.SEED,
        "max_iter": scaled.SOLVER.MAX_ITER,
        "base_lr": scaled.SOLVER.BASE_LR,
        "train_datasets": list(cfg.DATASETS.TRAIN),
        "test_datasets": list(cfg.DATASETS.TEST),
        "wall_time_s": round(wall_time_s, 1),
        "results": {
            task: {k: _finite_or_none(metrics.get(k)) for k in COCO_METRICS} for task, metrics in results.items()
        },
    }
    path = os.path.join(cfg.OUTPUT_DIR, RESULT_FILE)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    logging.getLogger("frn_det").info(f"Wrote {path}")


def main(args):
    start = time.perf_counter()
    cfg = setup(args)
    if comm.is_main_process():
        ensure_synthetic(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    comm.synchronize()

    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        # EvalHook evaluates after the last iteration even with TEST.EVAL_PERIOD 0.
        results = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process() and results:
        verify_results(cfg, results)
        write_result(cfg, args, results, time.perf_counter() - start)
    return results


def launch_main(args):
    """detectron2's launch; CPU training with several processes must use gloo, not NCCL.

    launch() picks NCCL whenever CUDA is visible, so for MODEL.DEVICE cpu the workers are started
    with no visible GPU (the spawned processes inherit the environment).
    """
    if args.num_gpus * args.num_machines > 1 and build_cfg(args)[0].MODEL.DEVICE == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    args = add_dataset_argument(default_argument_parser()).parse_args()
    print("Command Line Args:", args)
    launch_main(args)

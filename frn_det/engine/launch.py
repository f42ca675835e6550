"""Command-line conventions of frn-det's training tools: detectron2's argument parser plus
``--dataset`` (COCO json) and ``--voc-dataset`` (Pascal VOC folder), the run config, and
detectron2's launcher with CPU multi-process support and stops on SIGTERM / SIGINT
(frn_det.engine.preemption)."""
import logging
import os

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser as d2_argument_parser
from detectron2.engine import default_setup as d2_default_setup
from detectron2.engine import launch as d2_launch
from detectron2.engine.defaults import _try_get_key
from detectron2.utils.logger import setup_logger

from ..data import register_coco_dataset, register_voc_dataset
from .config import check_processes, load_cfg, load_run_cfg
from .preemption import run_stoppable

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the frn_det this process runs


def default_argument_parser(epilog=None):
    """detectron2's ``default_argument_parser`` plus ``--dataset NAME JSON IMAGE_ROOT`` and
    ``--voc-dataset NAME DIR SPLIT`` (both repeatable) and ``--voc-classes``."""
    parser = d2_argument_parser(epilog)
    parser.add_argument(
        "--dataset", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset (polygon or RLE masks) under NAME; repeatable. "
        "Use it with DATASETS.TRAIN / DATASETS.TEST overrides.",
    )
    parser.add_argument(
        "--voc-dataset", nargs=3, action="append", default=[], metavar=("NAME", "DIR", "SPLIT"),
        help="register split SPLIT (DIR/ImageSets/Main/SPLIT.txt) of the Pascal VOC folder DIR under NAME, "
        "evaluated with COCO AP; repeatable. Classes: --voc-classes, else every object name in DIR's xml files, sorted.",
    )
    parser.add_argument(
        "--voc-classes", nargs="+", metavar="CLASS", default=None,
        help="the class names of every --voc-dataset, in the order of the model's class indices",
    )
    return parser


def train_argument_parser():
    """:func:`default_argument_parser` plus tools/train_net.py's ``--check-data-only``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--check-data-only", action="store_true",
        help="only check the data of DATASETS.TRAIN and DATASETS.TEST (the heads' numbers of classes, and every "
        "image file with DATASETS.CHECK_IMAGES decode unless the overrides set another mode), then exit",
    )
    return parser


def register_datasets(args):
    """Registers the datasets the command line names (``--dataset``, ``--voc-dataset``)."""
    for name, json_file, image_root in args.dataset:
        register_coco_dataset(name, json_file, image_root)
    for name, dirname, split in args.voc_dataset:
        register_voc_dataset(name, dirname, split, args.voc_classes)


def run_cfg_from_args(args):
    """:func:`register_datasets`, then :func:`load_run_cfg` of the config and overrides."""
    register_datasets(args)
    return load_run_cfg(args.config_file, args.opts)


def default_setup(cfg, args):
    """detectron2's ``default_setup`` (output dir, loggers, config dump, seed) plus frn_det's logger,
    for yacs and LazyConfigs; the log names the frn_det it runs (a stale install elsewhere shows)."""
    d2_default_setup(cfg, args)
    output_dir = _try_get_key(cfg, "OUTPUT_DIR", "output_dir", "train.output_dir")
    setup_logger(output=output_dir, distributed_rank=comm.get_rank(), name="frn_det")
    logging.getLogger("frn_det").info(f"frn_det imported from {PACKAGE_DIR}")


def launch(main, args):
    """detectron2's ``launch(main, ...)`` with the arguments' process counts, for yacs (.yaml) and
    LazyConfig (.py) config files; the batch must split evenly across the processes.

    launch() picks NCCL whenever CUDA is visible, so CPU training with several processes (gloo)
    starts its workers with no visible GPU (the spawned processes inherit the environment). A run
    stopped by SIGTERM / SIGINT exits with 128 + the signal's number (frn_det.engine.preemption).
    """
    world_size = args.num_gpus * args.num_machines
    if args.config_file.endswith(".py"):  # a LazyConfig (tools/lazy_train_net.py)
        from .lazy import load_lazy_cfg

        cfg = load_lazy_cfg(args.config_file, args.opts)
        batch, device = cfg.dataloader.train.total_batch_size, cfg.train.device
        if batch % world_size:
            raise ValueError(f"dataloader.train.total_batch_size {batch} is not divisible by the {world_size} "
                             "processes (--num-gpus x --num-machines)")
    else:
        cfg = load_cfg(args.config_file, args.opts)
        check_processes(cfg, world_size)  # before any process starts
        device = cfg.MODEL.DEVICE
    if world_size > 1 and device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    run_stoppable(d2_launch, main, world_size, args.num_gpus, num_machines=args.num_machines,
                  machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))

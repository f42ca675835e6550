"""Loading a run's config: one ``load_cfg`` for every tool and test, and the checks that name a bad
key or file before training starts."""
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer

from ..data import check_registered, uses_rle_masks
from ..modeling import FRNOptions, add_frn_config

logger = logging.getLogger(__name__)

# The config keys through which detectron2's stock models take a norm name.
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.RETINANET.NORM", "MODEL.ROI_BOX_HEAD.NORM",
             "MODEL.ROI_MASK_HEAD.NORM")


def norm_everywhere(norm):
    """``KEY VALUE`` overrides that put ``norm`` in every place a stock model takes one."""
    return [item for key in NORM_KEYS for item in (key, norm)]


def load_cfg(config_file, opts=(), freeze=True):
    """get_cfg() + add_frn_config + ``config_file`` + ``opts`` (``KEY VALUE`` pairs), with MODEL.FRN checked.

    Raises FileNotFoundError for a missing config file and ValueError naming the MODEL.FRN key
    with an invalid value.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file} does not exist")
    cfg = get_cfg()
    add_frn_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    FRNOptions.from_cfg(cfg)  # validates MODEL.FRN.*
    if freeze:
        cfg.freeze()
    return cfg


def check_processes(cfg, world_size):
    """The batch a run on ``world_size`` processes trains with must split evenly across them."""
    scaled = DefaultTrainer.auto_scale_workers(cfg, world_size)  # REFERENCE_WORLD_SIZE may rescale it
    batch = scaled.SOLVER.IMS_PER_BATCH
    if batch % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH {batch} (after REFERENCE_WORLD_SIZE scaling) is not divisible by the "
                         f"{world_size} processes (--num-gpus x --num-machines)")


def load_run_cfg(config_file, opts=()):
    """:func:`load_cfg` plus what a training / evaluation run needs checked before it starts:
    registered datasets, an available device, MODEL.WEIGHTS that exist, and INPUT.MASK_FORMAT
    bitmask for RLE datasets."""
    cfg = load_cfg(config_file, opts, freeze=False)
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights} does not exist")
    check_registered(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    check_registered(cfg.DATASETS.TEST, "DATASETS.TEST")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available: add `MODEL.DEVICE cpu`")
    if cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT == "polygon":
        rle = [n for n in cfg.DATASETS.TRAIN if uses_rle_masks(n)]
        if rle:
            # detectron2 otherwise fails in a data-loader worker with "Failed to use mask_format=='polygon'".
            cfg.INPUT.MASK_FORMAT = "bitmask"
            logger.warning(f"{rle} have RLE masks: using INPUT.MASK_FORMAT bitmask")
    cfg.freeze()
    return cfg

"""Run logic of frn-det's tools (tools/train_net.py, lazy_train_net.py, coco_eval.py, export_model.py,
demo.py): config loading, the trainer, command-line conventions, the results contract, COCO
evaluation, export and the demo. The comparison of runs and the CPU study live in the checkout's
experiments/, not in the package."""
from .._requires import require_detectron2

require_detectron2("frn_det.engine")

from .checkpoint import ShapeCheckingCheckpointer  # noqa: E402
from .config import NORM_KEYS, check_processes, load_cfg, load_run_cfg, norm_everywhere  # noqa: E402
from .launch import (  # noqa: E402
    default_argument_parser,
    default_setup,
    launch,
    register_datasets,
    run_cfg_from_args,
    train_argument_parser,
)
from .results import COCO_METRICS, RESULT_FILE, make_result, read_result, write_result  # noqa: E402
from .trainer import Trainer  # noqa: E402

__all__ = [
    "COCO_METRICS", "NORM_KEYS", "RESULT_FILE", "ShapeCheckingCheckpointer", "Trainer", "check_processes", "default_argument_parser", "default_setup", "launch", "load_cfg",
    "load_run_cfg", "make_result", "norm_everywhere", "read_result", "register_datasets", "run_cfg_from_args",
    "train_argument_parser", "write_result",
]

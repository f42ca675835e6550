"""Arguments of tiny tools/train_net.py runs (64x64 images, a few iterations, CPU) shared by the
tests that train in a subprocess."""
import os


def dataset_args(root, prefix="tiny"):
    return [
        "--dataset", f"{prefix}_train", os.path.join(root, "annotations", "instances_train.json"), os.path.join(root, "train"),
        "--dataset", f"{prefix}_val", os.path.join(root, "annotations", "instances_val.json"), os.path.join(root, "val"),
    ]


def run_opts(out, max_iter=4, prefix="tiny"):
    return [
        "DATASETS.TRAIN", f"('{prefix}_train',)", "DATASETS.TEST", f"('{prefix}_val',)",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
        "DATALOADER.NUM_WORKERS", "0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", str(out),
    ]

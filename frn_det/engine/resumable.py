"""Exact resume: the training data stream and the random state as functions of the position in
training, so that a run interrupted after iteration k and resumed with ``--resume`` ends with the
same weights as the uninterrupted run (bitwise on CPU).

detectron2 restarts its shuffled data stream from the beginning on resume, and its data-loader
workers and the model draw from random generators whose state is not checkpointed. Here instead:

- :class:`ResumableTrainingSampler` yields ``(position, index)`` pairs of the infinite shuffled
  stream of detectron2's ``TrainingSampler`` seeded with SEED (detectron2's config path draws that
  seed from numpy's generator instead), from a start position the trainer sets after loading a
  checkpoint (iteration x total batch);
- :class:`PositionSeededDataset` seeds python's, numpy's and torch's generators from (seed,
  position) before mapping each sample, so augmentation depends neither on the worker nor on what
  came before;
- :class:`ReseedEachIteration` seeds the main process's generators from (seed, rank, iteration)
  before every step (Mask R-CNN samples proposals with torch's generator);
- :class:`GatherLossNormalizers` gives the main process, which alone writes checkpoints, every
  process's RetinaNet loss normaliser (each process keeps its own running value);
- :class:`EvaluateWhatTheInterruptionSkipped` runs the evaluation a stop cut short, so the resumed
  run's learning curve has every point of the uninterrupted run's;
- :func:`continue_metrics` drops what metrics.json recorded after the resumed checkpoint (the
  iterations that are trained again), through :class:`MetricsWriter`, which opens the file late.

TorchScript functions (detectron2's sigmoid focal loss) run unoptimized for their first calls and
as an optimized (fused) graph afterwards, with other rounding, so a resumed process would compute
its first steps differently: :func:`make_torchscript_repeatable` turns the optimization off.

Exact when batches are drawn in stream order: one aspect-ratio group (square images, as in the
synthetic datasets) or ``DATALOADER.ASPECT_RATIO_GROUPING False``. With mixed aspect ratios, the
images that waited in the other group at the interruption are skipped on resume. It needs
``SEED >= 0`` and ``DATALOADER.SAMPLER_TRAIN TrainingSampler``; otherwise detectron2's own loader is
used and a warning says that a resume will not be exact.
"""
import itertools
import logging
import os

import numpy as np
import torch
from detectron2.data import build_batch_data_loader, build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.data.common import DatasetFromList
from detectron2.engine import EvalHook, HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from detectron2.utils.file_io import PathManager

from .results import METRICS_FILE, read_curves, trim_metrics

logger = logging.getLogger(__name__)


def derived_seed(*keys) -> int:
    """A 31-bit seed that is a function of ``keys`` (non-negative integers) alone."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] >> 1)


class ResumableTrainingSampler(torch.utils.data.Sampler):
    """detectron2's TrainingSampler stream (``shuffle(range(size))`` per epoch, seeded), as
    ``(position, index)`` pairs from global position ``start``; this process takes the positions
    ``p`` with ``p % world_size == rank``."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self._size, self._seed, self._shuffle = size, int(seed), shuffle
        self._rank, self._world_size = comm.get_rank(), comm.get_world_size()
        self.start = 0  # set by the trainer before the data loader is first iterated

    def __iter__(self):
        first = self.start + (self._rank - self.start) % self._world_size
        indices = itertools.islice(self._infinite_indices(), first, None, self._world_size)
        return zip(itertools.count(first, self._world_size), indices)

    def _infinite_indices(self):
        g = torch.Generator()
        g.manual_seed(self._seed)
        while True:
            if self._shuffle:
                yield from torch.randperm(self._size, generator=g).tolist()
            else:
                yield from range(self._size)


class PositionSeededDataset(torch.utils.data.Dataset):
    """``mapper(dataset[index])`` for keys ``(position, index)``, with every random generator seeded
    from (seed, position) first."""

    def __init__(self, dataset, mapper, seed: int):
        self._dataset, self._mapper, self._seed = dataset, mapper, int(seed)

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, key):
        position, index = key
        seed_all_rng(derived_seed(self._seed, position))
        mapped = self._mapper(self._dataset[index])
        if mapped is None:
            raise ValueError(f"the training mapper returned None for dataset item {index}: resumable loading "
                             "needs a mapper that maps every item (filter the dataset instead)")
        return mapped


class ReseedEachIteration(HookBase):
    """Seeds python's, numpy's and torch's generators from (seed, rank, iteration) before each step."""

    def __init__(self, seed: int):
        self._seed = int(seed)

    def before_step(self):
        seed_all_rng(derived_seed(self._seed, comm.get_rank(), self.trainer.iter))


class GatherLossNormalizers(HookBase):
    """After each step of a multi-process run, every process's ``model.loss_normalizer`` (RetinaNet's
    running number of foreground anchors, a plain attribute that each process updates from its own
    images; set at its first forward) in ``by_rank``, for the main process's checkpoint. Register it
    before the checkpointers."""

    def __init__(self, model):
        self._model, self.by_rank = model, None

    def after_step(self):
        if comm.get_world_size() > 1 and hasattr(self._model, "loss_normalizer"):
            self.by_rank = [float(v) for v in comm.all_gather(float(self._model.loss_normalizer))]


class EvaluateWhatTheInterruptionSkipped(HookBase):
    """Before training on, evaluates a resumed checkpoint whose due evaluation is not in metrics.json.

    detectron2 writes the checkpoint of an evaluation point before it evaluates (PeriodicCheckpointer
    comes before EvalHook), so a run stopped during that evaluation resumes after it and its learning
    curve would lack the point. The result is recorded under the checkpoint's iteration, where the
    uninterrupted run has it. Register it right after ``eval_hook``."""

    def __init__(self, eval_hook: EvalHook, output_dir: str):
        self._eval_hook, self._output_dir = eval_hook, output_dir

    def before_train(self):
        done, max_iter, period = self.trainer.start_iter, self.trainer.max_iter, self._eval_hook._period
        if done == 0 or period <= 0 or done % period or done >= max_iter:
            return  # nothing was due, or it is the final evaluation, which runs anyway
        # the main process's metrics.json decides for every process (others may not share its disk)
        evaluated = comm.is_main_process() and any(
            p["iteration"] == done for curve in read_curves(self._output_dir, max_iter, 1).values() for p in curve)
        if comm.all_gather(evaluated)[0]:
            return
        logger.info(f"The evaluation after iteration {done} is not in metrics.json (the run stopped during it): "
                    "evaluating the checkpoint before training on")
        self.trainer.storage.iter = done - 1  # where EvalHook records the evaluation after iteration `done`
        self._eval_hook._do_eval()
        self.trainer.storage.iter = done


class MetricsWriter(JSONWriter):
    """detectron2's JSONWriter of OUTPUT_DIR/metrics.json, but the file is opened at the first write,
    not when the writer is built: the trainer builds its writers before it loads the checkpoint to
    resume from, and :func:`continue_metrics` replaces the file in between."""

    def __init__(self, json_file, window_size=20):  # JSONWriter's, without opening the file
        self._json_file, self._window_size, self._last_write = json_file, window_size, -1
        self._file_handle = None

    def write(self):
        if self._file_handle is None:
            self._file_handle = PathManager.open(self._json_file, "a")
        super().write()

    def close(self):
        if self._file_handle is not None:
            super().close()


def event_writers(output_dir, max_iter=None):
    """detectron2's ``default_writers`` with :class:`MetricsWriter` for metrics.json."""
    PathManager.mkdirs(output_dir)
    return [CommonMetricPrinter(max_iter), MetricsWriter(os.path.join(output_dir, METRICS_FILE)),
            TensorboardXWriter(output_dir)]


def continue_metrics(output_dir, start_iter):
    """On the main process of a resumed run: metrics.json without the records after iteration
    ``start_iter - 1`` (the checkpoint's), which the run trains again."""
    if comm.is_main_process():
        dropped = trim_metrics(output_dir, start_iter - 1)
        if dropped:
            logger.info(f"Dropped {dropped} lines of {os.path.join(output_dir, METRICS_FILE)} written after iteration "
                        f"{start_iter - 1}, the checkpoint's: they are trained again")


def make_torchscript_repeatable():
    """Run TorchScript functions unoptimized on every call (process-wide), so that a step computes
    the same whether it is the process's first or its thousandth."""
    torch._C._set_graph_executor_optimize(False)


def is_resumable(cfg) -> bool:
    return cfg.SEED >= 0 and cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"


def build_resumable_train_loader(cfg, args=None):
    """detectron2's training loader for ``cfg`` with a :class:`ResumableTrainingSampler` (reachable
    as the loader's ``resumable_sampler``); detectron2's own when the cfg cannot resume exactly.

    ``args``: ``_train_loader_from_config(cfg)`` (the dataset, mapper and batch settings of
    build_detection_train_loader), when the caller has it already; its sampler is used only by
    detectron2's own loader."""
    if args is None:
        args = _train_loader_from_config(cfg)
    if not is_resumable(cfg):
        logger.warning(f"SEED {cfg.SEED} / DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN}: a resumed run "
                       "will not be exact (needs SEED >= 0 and TrainingSampler)")
        return build_detection_train_loader(**args)  # what build_detection_train_loader(cfg) builds
    dataset = PositionSeededDataset(DatasetFromList(args["dataset"], copy=False), args["mapper"], cfg.SEED)
    sampler = ResumableTrainingSampler(len(dataset), seed=cfg.SEED)
    loader = build_batch_data_loader(dataset, sampler, args["total_batch_size"],
                                     aspect_ratio_grouping=args["aspect_ratio_grouping"],
                                     num_workers=args["num_workers"], seed=cfg.SEED)
    loader.resumable_sampler = sampler
    return loader

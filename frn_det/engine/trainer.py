"""The trainer of frn-det runs: detectron2's DefaultTrainer with the FRN-aware optimizer, COCO
evaluation, multi-process DDP on CPU, exact resume, checkpoints checked against the model and
written whole (frn_det.engine.checkpoint), a checkpoint and a clean exit on SIGTERM / SIGINT
(frn_det.engine.preemption), and the data checked before the first iteration (frn_det.data.validation)."""
import contextlib
import functools
import os
import weakref
from unittest import mock

import detectron2.utils.comm as comm
from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.engine import DefaultTrainer, EvalHook, PeriodicCheckpointer, defaults
from detectron2.evaluation import COCOEvaluator

from .. import kill_points
from ..data import ensure_coco_json
from ..data.validation import NameImageErrors, check_data
from ..modeling import build_optimizer
from .checkpoint import ShapeCheckingCheckpointer
from .preemption import StopOnSignal
from .resumable import (
    EvaluateWhatTheInterruptionSkipped,
    GatherLossNormalizers,
    ReseedEachIteration,
    build_resumable_train_loader,
    continue_metrics,
    event_writers,
    is_resumable,
    make_torchscript_repeatable,
)


@contextlib.contextmanager
def _cpu_ddp(cfg):
    """DefaultTrainer wraps the model with ``create_ddp_model``, which passes device_ids=[local rank];
    DistributedDataParallel rejects device_ids for a CPU model. For MODEL.DEVICE cpu, pass None."""
    if cfg.MODEL.DEVICE != "cpu" or comm.get_world_size() == 1:
        yield
        return
    with mock.patch.object(defaults, "create_ddp_model", functools.partial(defaults.create_ddp_model, device_ids=None)):
        yield


class Trainer(DefaultTrainer):
    """DefaultTrainer with FRN/TLU parameters counted as norm parameters (SOLVER.WEIGHT_DECAY_NORM, as
    BN and GN get), COCO evaluation of boxes (and masks), CPU multi-process training, a resume that
    continues the data stream and random state exactly where the checkpoint left them and evaluates
    first when the stop cut an evaluation short (frn_det.engine.resumable), checkpoints that must
    fit the model and cannot tear (ShapeCheckingCheckpointer), and stops on SIGTERM / SIGINT with a
    checkpoint (StopOnSignal)."""

    def __init__(self, cfg):
        if is_resumable(cfg):
            make_torchscript_repeatable()
        with _cpu_ddp(cfg):
            super().__init__(cfg)
        self.checkpointer = ShapeCheckingCheckpointer(self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        for hook in self._hooks:  # built by DefaultTrainer.__init__ with its checkpointer
            if isinstance(hook, (PeriodicCheckpointer, StopOnSignal)):
                hook.checkpointer = self.checkpointer

    @classmethod
    def build_train_loader(cls, cfg):
        """The (resumable) training loader, built after :meth:`check_data` passed on the training set
        it loads; its mapper names the file and dataset of an image it cannot read."""
        args = _train_loader_from_config(cfg)
        cls.check_data(cfg, train_dicts=args["dataset"])
        args["mapper"] = NameImageErrors(args["mapper"], cfg.DATASETS.TRAIN)
        return build_resumable_train_loader(cfg, args)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader, whose mapper names the file and dataset of an image it cannot read."""
        mapper = NameImageErrors(DatasetMapper(cfg, False), [dataset_name])
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @staticmethod
    def check_data(cfg, train=True, test=True, train_dicts=None, **kwargs):
        """:func:`frn_det.data.validation.check_data` on every process: the heads' class counts on
        each, the image files (DATASETS.CHECK_IMAGES) on the main process while the others wait.
        Called by :meth:`build_train_loader`, so training starts only on data that passed."""
        report = check_data(cfg, train=train, test=test, train_dicts=train_dicts, images=comm.is_main_process(),
                            **kwargs)
        comm.synchronize()  # a failed check ends the main process, and the launcher the others
        return report

    @classmethod
    def check_data_only(cls, cfg, opts):
        """tools/train_net.py --check-data-only: :meth:`check_data` decoding every image unless the
        command line's overrides ``opts`` set DATASETS.CHECK_IMAGES; prints what passed."""
        mode = cfg.DATASETS.CHECK_IMAGES if "DATASETS.CHECK_IMAGES" in opts[::2] else "decode"
        report = cls.check_data(cfg, mode=mode)
        if comm.is_main_process():
            checked = ", ".join(f"{r['images']} images of '{n}' in {r['seconds']:.1f} s" for n, r in report.items())
            print(f"Data check passed (classes; images: {mode}{': ' + checked if checked else ''})")

    def build_hooks(self):
        hooks = super().build_hooks()
        at_eval = next(i for i, h in enumerate(hooks) if isinstance(h, EvalHook))
        hooks.insert(at_eval + 1, EvaluateWhatTheInterruptionSkipped(hooks[at_eval], self.cfg.OUTPUT_DIR))
        hooks.insert(at_eval, StopOnSignal(self.checkpointer))  # after the periodic checkpoint, before evaluating
        self._normalizers = GatherLossNormalizers(self._model())  # before the checkpointers
        hooks.insert(next(i for i, h in enumerate(hooks) if isinstance(h, (PeriodicCheckpointer, StopOnSignal))),
                     self._normalizers)
        return [ReseedEachIteration(self.cfg.SEED)] + hooks if is_resumable(self.cfg) else hooks

    def build_writers(self):
        return event_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    def _model(self):
        model = self._trainer.model
        return model.module if hasattr(model, "module") else model  # under DistributedDataParallel

    def state_dict(self):
        state = super().state_dict()
        # RetinaNet's running number of foreground anchors normalises its losses and is a plain
        # attribute, not a buffer: without it here a resumed run restarts it at its initial value.
        # Each process has its own ("loss_normalizer" is the main process's, as before).
        if hasattr(self._model(), "loss_normalizer"):
            state["loss_normalizer"] = float(self._model().loss_normalizer)
            if self._normalizers.by_rank:
                state["loss_normalizer_by_rank"] = self._normalizers.by_rank
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "loss_normalizer" in state:
            by_rank = state.get("loss_normalizer_by_rank")
            mine = by_rank[comm.get_rank()] if by_rank and len(by_rank) == comm.get_world_size() else None
            self._model().loss_normalizer = state["loss_normalizer"] if mine is None else mine

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume)
        if self.start_iter:
            continue_metrics(self.cfg.OUTPUT_DIR, self.start_iter)
        sampler = getattr(self._trainer.data_loader, "resumable_sampler", None)
        if sampler is not None:  # continue the data stream after the images the checkpoint has seen
            sampler.start = self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        kill_points.reached_nth("evaluation", comm.get_rank())
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCOEvaluator writing OUTPUT_DIR/inference/ (one test dataset) or inference/<dataset>/ (several:
        each dataset's detections in a file of its own)."""
        several = len(cfg.DATASETS.TEST) > 1
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", *([dataset_name] if several else []))
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        ensure_coco_json(dataset_name)  # a Pascal VOC dataset's ground truth, current (frn_det.data.voc)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)

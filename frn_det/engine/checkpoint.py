"""detectron2's DetectionCheckpointer, with checkpoints that survive a kill and damaged ones named.

- **Fit**: a checkpoint whose tensors do not fit the model is an error that names the first
  mismatching keys and shapes, before training starts. detectron2 skips every tensor whose shape
  differs and trains on with a warning, which is right for fine-tuning with another number of
  classes or anchors (only the final predictors differ) and wrong for a checkpoint of another
  architecture (an R50 checkpoint in an R18 model trains from scratch without saying so).
  Mismatches in the final prediction layers are still skipped with detectron2's warning.
- **Whole or absent**: checkpoints and ``last_checkpoint`` are written by :func:`frn_det.atomic.atomic_write`
  (fvcore writes ``torch.save`` into the final name, so a kill or a full disk leaves a torn file
  there). Names and contents are fvcore's: stock detectron2 loads them, and this loads theirs.
  A save that fails leaves the previous checkpoint and ``last_checkpoint`` as they were.
- **Damaged files named**: a file that cannot be read as a checkpoint raises
  :class:`DamagedCheckpointError` naming it (detectron2 ends in ``OSError: [Errno 22]`` or a zip
  error). ``--resume`` skips a damaged newest checkpoint, with a warning naming it, for the newest
  readable one before it, and refuses, naming them all, only when none is readable.
"""
import logging
import os
import re

import detectron2.utils.comm as comm
import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..atomic import atomic_write, remove_stale_temporaries

logger = logging.getLogger(__name__)

# The final prediction layers of detectron2's detectors: their shapes follow NUM_CLASSES and the anchors.
PREDICTOR_KEYS = re.compile(
    r"(^|\.)(cls_score|bbox_pred|box_predictor\.\w+|predictor|mask_fcn_logits|objectness_logits|anchor_deltas)"
    r"\.(weight|bias)$")
LAST_CHECKPOINT = "last_checkpoint"
_RUN_CHECKPOINT = re.compile(r"^model_(\d{7}|final)\.pth$")  # what PeriodicCheckpointer writes


class DamagedCheckpointError(ValueError):
    """A file that cannot be read as a checkpoint (truncated, corrupt, or something else)."""


def _rank(path):
    """Where a checkpoint PeriodicCheckpointer wrote comes in its run (its iteration; the final one
    last); None for other names."""
    match = _RUN_CHECKPOINT.match(os.path.basename(path))
    return None if match is None else float("inf") if match.group(1) == "final" else int(match.group(1))


def run_checkpoints(save_dir, before=None):
    """The checkpoints PeriodicCheckpointer wrote in ``save_dir`` (``model_<iteration>.pth``,
    ``model_final.pth``), newest first; only those older than checkpoint ``before`` if given."""
    try:
        paths = [os.path.join(save_dir, n) for n in os.listdir(save_dir) if _RUN_CHECKPOINT.match(n)]
    except FileNotFoundError:
        return []
    limit = None if before is None else _rank(before)
    paths = [p for p in paths if p != before and (limit is None or _rank(p) < limit)]
    return sorted(paths, key=_rank, reverse=True)


class ShapeCheckingCheckpointer(DetectionCheckpointer):
    def __init__(self, model, save_dir="", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        if self.save_to_disk and save_dir and "://" not in save_dir:
            for path in remove_stale_temporaries(save_dir):  # a run killed while writing left them
                logger.warning(f"Removed {path}: the temporary file of a write that did not finish")

    # ---- writing

    def save(self, name, **kwargs):
        """fvcore's Checkpointer.save, through the one writer: the file is whole or absent."""
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:  # a remote PathManager folder: fvcore's own write
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_write(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        with atomic_write(os.path.join(self.save_dir, LAST_CHECKPOINT)) as f:
            f.write(last_filename_basename)

    # ---- reading

    def load(self, path, *args, **kwargs):
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._parsed_url_during_load = None  # detectron2 resets it only when the load succeeds

    def _load_file(self, filename):
        try:
            checkpoint = super()._load_file(filename)
        except Exception as e:  # noqa: BLE001  torch.load / pickle raise many kinds on a torn file
            raise DamagedCheckpointError(
                f"{filename} is damaged (truncated or corrupt) or not a checkpoint: {type(e).__name__}: {e}") from e
        model = checkpoint.get("model") if isinstance(checkpoint, dict) else None
        if not isinstance(model, dict):
            raise DamagedCheckpointError(
                f"{filename} is not a checkpoint: it holds {type(model if isinstance(checkpoint, dict) else checkpoint).__name__}, "
                "not a dict of tensors (under 'model', or at its top level)")
        return checkpoint

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        misfits = [(k, tuple(ckpt), tuple(model)) for k, ckpt, model in incompatible.incorrect_shapes
                   if not PREDICTOR_KEYS.search(k)]
        if misfits:
            shown = "; ".join(f"{k}: {c} in the checkpoint, {m} in the model" for k, c, m in misfits[:3])
            raise ValueError(
                f"the checkpoint does not fit this model: {len(misfits)} tensors have other shapes ({shown}"
                f"{'; ...' if len(misfits) > 3 else ''}). Check MODEL.WEIGHTS (or the run's last checkpoint "
                "with --resume) against the config.")
        return incompatible

    def resume_or_load(self, path, *, resume=True):
        """fvcore's resume_or_load; with ``resume``, the checkpoint ``last_checkpoint`` names, or when
        it is damaged or missing the newest readable one before it (see the module docstring)."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        named = self.get_checkpoint_file()
        candidates = [named] + run_checkpoints(self.save_dir, before=named)
        skipped = []
        for candidate in candidates:
            if not os.path.isfile(candidate):
                skipped.append(f"{candidate} (missing)")
                continue
            try:
                extra = self.load(candidate)
            except DamagedCheckpointError as e:
                skipped.append(str(e))
                continue
            if skipped:
                logger.warning(f"--resume: skipped {'; '.join(skipped)}. Resuming from {candidate} instead.")
            chosen = comm.all_gather(candidate)  # every process must resume from the same iteration
            if len(set(chosen)) > 1:
                raise RuntimeError(f"the processes resumed from different checkpoints: {chosen}")
            return extra
        raise DamagedCheckpointError(
            f"--resume: no readable checkpoint in {self.save_dir}:\n  " + "\n  ".join(skipped)
            + f"\nRemove {LAST_CHECKPOINT} to train from scratch (or MODEL.WEIGHTS), or restore a checkpoint.")


"""detectron2's DetectionCheckpointer, but a checkpoint whose tensors do not fit the model is an error
that names the first mismatching keys and shapes, before training starts.

detectron2 skips every tensor whose shape differs and trains on with a warning, which is right for
fine-tuning with another number of classes or anchors (only the final predictors differ) and wrong
for a checkpoint of another architecture (an R50 checkpoint in an R18 model trains from scratch
without saying so). Mismatches in the final prediction layers are still skipped with detectron2's warning.
"""
import re

from detectron2.checkpoint import DetectionCheckpointer

# The final prediction layers of detectron2's detectors: their shapes follow NUM_CLASSES and the anchors.
PREDICTOR_KEYS = re.compile(
    r"(^|\.)(cls_score|bbox_pred|box_predictor\.\w+|predictor|mask_fcn_logits|objectness_logits|anchor_deltas)"
    r"\.(weight|bias)$")


class ShapeCheckingCheckpointer(DetectionCheckpointer):
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

"""configs/bccd_grid/, rendered from grid.yaml (the comparison's settings and the reasons for them
live there, as data); tests/test_configs.py checks the committed YAMLs equal this output."""
import os
from fractions import Fraction

from ..cpu_grid.configs import _lr_name, leaf
from ..generated import read_settings
from ..paths import CONFIGS

GRID_DIR = os.path.join(CONFIGS, "bccd_grid")
SETTINGS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grid.yaml")
FAMILY = "retinanet_R18_FPN"
TWO_STAGE = "faster_rcnn_R18_FPN"
TITLE = "BCCD comparison (docs/results.md)"


def settings():
    """grid.yaml as a dict."""
    return read_settings(SETTINGS_FILE)


def _leaf(norm, batch, lr_per_image, tag, note="", extra=None, family=FAMILY):
    return leaf(family, norm, batch, lr_per_image, tag, note, extra, spec=settings()["schedule"],
                base=f"../../bccd/{family}_{norm}.yaml", title=TITLE)


def _name(arm, batch, tag="", family=FAMILY):
    a = settings()["arms"][arm]
    parts = [f"{a['norm']}_{batch}img"] + [t for t in (a.get("variant"), tag) if t]
    return f"{family}/{'_'.join(parts)}.yaml"


def sweep_configs():
    """{arm: [(config relative to configs/bccd_grid, lr per image)]} of the learning-rate sweep."""
    s, b = settings(), settings()["sweep_batch"]
    return {arm: [(_name(arm, b, _lr_name(lr, b)), lr) for lr in s["sweep_lr_per_image"][arm]] for arm in s["arms"]}


def cell_config(arm, batch, family=FAMILY):
    """The config of an arm's grid cell at ``batch`` (RetinaNet at the sweep's batch: its best sweep
    run's), or None until the arm's best rate is set."""
    s = settings()
    if s["best_lr_per_image"][arm] is None:
        return None
    swept = family == FAMILY and batch == s["sweep_batch"]
    return _name(arm, batch, _lr_name(s["best_lr_per_image"][arm], batch) if swept else "", family)


def _large_batch_lr(arm):
    s = settings()
    return f"{float(Fraction(s['best_lr_per_image'][arm]) * Fraction(s['large_batch_fraction'])):g}"


def study_configs():
    """[(config relative to configs/bccd_grid, arm name, arm settings)] of the study at the sweep's batch."""
    s = settings()
    return [(f"{FAMILY}/{arm['norm']}_{s['sweep_batch']}img_{name}.yaml", name, arm) for name, arm in s["study"].items()]


def render_grid():
    """{path relative to configs/bccd_grid: text}: the sweep, and once an arm's best rate is set its
    cells at the other batches; the study once FRN's is."""
    s, b = settings(), settings()["sweep_batch"]
    out = {}
    for arm, configs in sweep_configs().items():
        a = s["arms"][arm]
        for rel, lr in configs:
            tag = "_".join(t for t in (a.get("variant"), _lr_name(lr, b)) if t)
            note = f"{a['note']}; learning-rate sweep" if a.get("note") else "learning-rate sweep"
            out[rel] = _leaf(a["norm"], b, lr, tag, note, a.get("config"))
        best = s["best_lr_per_image"][arm]
        for batch in s["batches"]:
            if best is not None and batch != b:
                out[cell_config(arm, batch)] = _leaf(a["norm"], batch, best, a.get("variant", ""), a.get("note", ""),
                                                     a.get("config"))
        if best is not None:
            note = f"{a.get('note', a['norm'])}; {s['large_batch_fraction']} of the linear rule's rate"
            out[cell_config(arm, s["large_batch"])] = _leaf(a["norm"], s["large_batch"], _large_batch_lr(arm),
                                                            a.get("variant", ""), note, a.get("config"))
            if arm in s["two_stage_arms"]:
                out[cell_config(arm, b, TWO_STAGE)] = _leaf(a["norm"], b, best, a.get("variant", ""), a.get("note", ""),
                                                            a.get("config"), family=TWO_STAGE)
    if s["best_lr_per_image"]["FRN"] is not None:
        for rel, name, arm in study_configs():
            out[rel] = _leaf(arm["norm"], b, s["best_lr_per_image"]["FRN"], name, arm["note"], arm["config"])
    return out


TARGETS = ((GRID_DIR, render_grid),)


def listed(part, batch=None):
    """Config paths (from the checkout's root) of a part of the comparison, for run.sh: "sweep",
    "cells" at ``batch`` (those whose arm has its rate), "two-stage", "study" (once FRN's rate is set)."""
    if part == "sweep":
        rels = [rel for configs in sweep_configs().values() for rel, _ in configs]
    elif part == "cells":
        rels = [c for c in (cell_config(arm, batch) for arm in settings()["arms"]) if c is not None]
    elif part == "two-stage":
        rels = [c for c in (cell_config(arm, settings()["sweep_batch"], TWO_STAGE) for arm in settings()["two_stage_arms"])
                if c is not None]
    elif part == "study":
        rels = [rel for rel, _, _ in study_configs()] if settings()["best_lr_per_image"]["FRN"] is not None else []
    else:
        raise ValueError(f"unknown part {part!r}: sweep, cells, two-stage or study")
    return [os.path.relpath(os.path.join(GRID_DIR, rel)) for rel in rels]


if __name__ == "__main__":  # python -m experiments.bccd.configs sweep | cells BATCH | two-stage | study
    import sys

    print(*listed(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None))

"""configs/cpu_grid/ and configs/cpu_grid_short/, rendered from grid.yaml (the study's settings and
the reasons for them live there, as data); tests/test_configs.py checks the committed YAMLs equal
this output."""
import json
import os
from fractions import Fraction

from ..generated import HEADER, fmt_lr, fmt_steps, read_settings
from ..paths import CONFIGS

GRID_DIR = os.path.join(CONFIGS, "cpu_grid")
SHORT_DIR = os.path.join(CONFIGS, "cpu_grid_short")
SETTINGS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grid.yaml")
FAMILY = "retinanet_R18_FPN"
MASK_FAMILY = "mask_rcnn_R18_FPN"


def settings():
    """grid.yaml as a dict."""
    return read_settings(SETTINGS_FILE)


def _yaml_value(v):
    if isinstance(v, bool):
        return str(v)  # yacs reads True / False
    return json.dumps(v) if isinstance(v, (str, list)) else str(v)


def config_lines(tree, indent=0):
    """A nested {KEY: value} as detectron2 YAML lines (strings double-quoted)."""
    out = ""
    for key, v in tree.items():
        pad = "  " * indent
        out += f"{pad}{key}:\n" + config_lines(v, indent + 1) if isinstance(v, dict) else f"{pad}{key}: {_yaml_value(v)}\n"
    return out


def leaf(family, norm, batch, lr_per_image, variant="", note="", extra=None, schedule="grid_schedule",
         spec=None, base=None, title="CPU comparison (docs/results.md)"):
    """One leaf of configs/cpu_grid/<family>/: the schedule named ``schedule`` (or given as ``spec``)
    at ``batch``, plus the config tree ``extra`` (its SOLVER keys join the schedule's SOLVER block),
    inheriting ``base`` (default: the synthetic task's config of ``family`` and ``norm``)."""
    extra = dict(extra or {})
    solver_extra = config_lines(extra.pop("SOLVER", {}), indent=1)
    spec = spec or settings()[schedule]
    base = base or f"../../synthetic/{family}_{norm}.yaml"
    counts = {"MAX_ITER": spec["images_seen"], "WARMUP_ITERS": spec["warmup_images"],
              "EVAL_PERIOD": spec["eval_images"], "CHECKPOINT_PERIOD": spec["checkpoint_images"]}
    for key, n in list(counts.items()) + [("STEPS", s) for s in spec["step_images"]]:
        if n % batch:
            raise ValueError(f"{key}: {n} images is not a multiple of the batch {batch}")
    it = {k: v // batch for k, v in counts.items()}
    lr = float(Fraction(lr_per_image) * batch)
    steps = fmt_steps(tuple(s // batch for s in spec["step_images"]))
    what = f"\n# Variant {variant}: {note}." if variant else ""
    return HEADER + f"""\
# {title}: {family}, {norm}, batch {batch} on one process.{what}
# {spec["images_seen"]} images seen; lr = {lr_per_image} per image x batch; warm-up over {spec["warmup_images"]} images;
# lr x 0.1 after {" and ".join(map(str, spec["step_images"]))} images; evaluated every {spec["eval_images"]} images.
_BASE_: "{base}"
{config_lines(extra)}SOLVER:
  IMS_PER_BATCH: {batch}
  REFERENCE_WORLD_SIZE: 1  # {batch} image{"s" if batch > 1 else ""} per process on any process count
  BASE_LR: {fmt_lr(lr)}
  MAX_ITER: {it["MAX_ITER"]}
  STEPS: {steps}
  WARMUP_ITERS: {it["WARMUP_ITERS"]}
  CHECKPOINT_PERIOD: {it["CHECKPOINT_PERIOD"]}
{solver_extra}TEST:
  EVAL_PERIOD: {it["EVAL_PERIOD"]}
"""


def _lr_name(lr_per_image, batch):
    return f"lr{float(Fraction(lr_per_image) * batch):g}"


def _sweep(schedule, extra_lr_per_image=None):
    s, b = settings(), settings()["sweep_batch"]
    extra = extra_lr_per_image or {}
    return {f"{FAMILY}/{norm}_{b}img_{_lr_name(lr, b)}.yaml":
            leaf(FAMILY, norm, b, lr, _lr_name(lr, b), "learning-rate sweep", schedule=schedule)
            for norm in s["norms"] for lr in s["sweep_lr_per_image"] + extra.get(norm, [])}


def large_batch_fractions(norm):
    """The fractions of the linear rule's rate that the large-batch sweep tries for ``norm``."""
    s = settings()
    return s["large_batch_sweep_fractions"] + s["large_batch_sweep_extra_fractions"].get(norm, [])


def render_grid():
    """{path relative to configs/cpu_grid: text}: the sweep, and (once the sweep has set each norm's
    best lr) the grid, the ablations, the Mask R-CNN pair and the study's arms."""
    s, b = settings(), settings()["sweep_batch"]
    big = s["batches"][-1]
    out = _sweep("sweep_schedule", s["sweep_extra_lr_per_image"])
    best = s["best_lr_per_image"]
    for norm in s["norms"]:
        if best[norm] is None:
            continue
        for batch in s["batches"]:
            out[f"{FAMILY}/{norm}_{batch}img.yaml"] = leaf(FAMILY, norm, batch, best[norm])
        for fraction in large_batch_fractions(norm):
            lr_per_image = f"{float(Fraction(best[norm]) * Fraction(fraction)):g}"
            lr = _lr_name(lr_per_image, big)
            out[f"{FAMILY}/{norm}_{big}img_{lr}.yaml"] = leaf(
                FAMILY, norm, big, lr_per_image, lr, f"learning-rate sweep at batch {big}, {fraction} of the linear rule")
    if best["FRN"] is not None:
        for name, arm in s["ablations"].items():
            out[f"{FAMILY}/FRN_{b}img_{name}.yaml"] = leaf(FAMILY, "FRN", b, best["FRN"], name, arm["note"],
                                                           arm["config"])
    for norm in s["mask_norms"]:
        if best[norm] is not None:
            out[f"{MASK_FAMILY}/{norm}_{b}img.yaml"] = leaf(MASK_FAMILY, norm, b, best[norm])
    for rel, norm, name, lr, arm in study_arms():
        out[rel] = leaf(FAMILY, norm, b, lr, name, arm["note"], arm["config"])
    for rel, norm, batch, name, lr, arm in grid_variants():
        if rel not in out:  # at the sweep's batch the study arm's own leaf
            out[rel] = leaf(FAMILY, norm, batch, lr, name, arm["note"], arm["config"])
    return out


def study_arms():
    """[(leaf relative to configs/cpu_grid, norm, arm name, lr per image, arm settings)] of the study."""
    s, b = settings(), settings()["sweep_batch"]
    arms = []
    for name, arm in s["study"].items():
        for norm in arm.get("norms", [arm.get("norm")]):
            lr = _arm_lr(arm.get("lr_per_image", s["study_lr_per_image"]), s["best_lr_per_image"][norm])
            arms.append((f"{FAMILY}/{norm}_{b}img_{name}.yaml", norm, name, lr, arm))
    return arms


def _arm_lr(spec, best):
    """An arm's lr per image: a fraction, "best" (the norm's grid rate) or "K*best" (K times it)."""
    factor, _, tail = spec.rpartition("*")
    if tail != "best":
        return spec
    return f"{float(Fraction(factor) * Fraction(best)):g}" if factor else best


def grid_variants():
    """[(leaf relative to configs/cpu_grid, norm, batch, arm name, lr per image, arm settings)]: each
    study arm of grid.yaml's ``grid_variants`` at every batch of the grid (at the sweep's batch it is
    the study arm's own leaf)."""
    s = settings()
    return [(f"{FAMILY}/{norm}_{batch}img_{name}.yaml", norm, batch, name, lr, arm)
            for _, norm, name, lr, arm in study_arms() if name in s.get("grid_variants", [])
            for batch in s["batches"]]


def render_short():
    """{path relative to configs/cpu_grid_short: text}: the first schedule's learning-rate sweep."""
    return _sweep("short_schedule")


def parts():
    """{name: (configs relative to configs/cpu_grid, seeds or None for all)}: the parts of the CPU
    comparison that docs/results.md shows on their own (tables, curves)."""
    s, b = settings(), settings()["sweep_batch"]
    big = s["batches"][-1]
    names = list(render_grid())
    return {
        "cpu_grid_norms": ([f"{FAMILY}/{n}_{k}img.yaml" for n in s["norms"] for k in s["batches"]]
                           + [f"{MASK_FAMILY}/{n}_{b}img.yaml" for n in s["mask_norms"]], None),
        "cpu_grid_ablations": ([f"{FAMILY}/FRN_{b}img.yaml"] + [f"{FAMILY}/FRN_{b}img_{a}.yaml" for a in s["ablations"]],
                               None),
        "cpu_grid_sweep": ([n for n in names if n.startswith(f"{FAMILY}/") and f"_{b}img_lr" in n], (0,)),
        # the large-batch sweep beside the grid's cells at that batch (the linear rule's rate), seed 0
        f"cpu_grid_sweep_batch{big}": ([n for n in names if f"_{big}img_lr" in n]
                                       + [f"{FAMILY}/{n}_{big}img.yaml" for n in s["norms"]], (0,)),
        # the study's arms beside the FRN and GN runs they are paired with
        "cpu_grid_study": ([f"{FAMILY}/{n}_{b}img.yaml" for n in ("FRN", "GN")]
                           + [rel for rel, *_ in study_arms()], None),
        # the variants that closed the gap in the grid, beside the grid's FRN and GN cells
        "cpu_grid_variants": ([f"{FAMILY}/{n}_{k}img.yaml" for n in ("FRN", "GN") for k in s["batches"]]
                              + [rel for rel, *_ in grid_variants()], None),
    }


# (output folder, renderer) of the CPU grids
TARGETS = ((GRID_DIR, render_grid), (SHORT_DIR, render_short))

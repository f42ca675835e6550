"""Diagnostics of trained detectors on the synthetic task, no training (issue 22, docs/results.md "Why
FRN trails GN"): what reaches each norm layer, and how an object is named alone on its background
against in its image.

    python -m experiments.cpu_grid.diagnostics RUN_DIR... [--labels L...] [--num-images 100] --out PREFIX

RUN_DIR: a tools/train_net.py output folder (its config.yaml and model_final.pth). Val images are drawn
again from the generator settings stored in the test set's annotation file, so each object can be
shown alone on exactly the background it lies on. Writes PREFIX.md (tables), PREFIX_layers.csv (one
row per model and norm layer), PREFIX_objects.csv (one row per model and object) and PREFIX.png.

- Norm layers (FRN and GroupNorm), on the full images, per plane (sample x channel) of the layer's
  input: its mean square nu2 against the layer's eps, and the share of nu2 that is the plane's squared
  mean (mu^2 / nu2: what an uncentred norm divides by but does not subtract); for FRN with a TLU the
  share of outputs at tau.
- Objects: each annotated val object is "detected as" the class of the highest-scoring detection of
  score >= 0.3 whose box has IoU >= 0.5 with it (tools/coco_eval.py --errors' rule), once in its image
  and once alone (its visible pixels pasted on its own background); accuracy by class and by the
  object's share of the image, and the flips between the two.
"""
import argparse
import csv
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from frn_det.data import ensure_synthetic
from frn_det.data.register import SYNTHETIC_NAMES
from frn_det.data.synthetic import CLASSES, render_scene, spec_of
from frn_det.engine import load_cfg
from frn_det.engine.coco_eval import best_detections
from frn_det.engine.plotting import figure
from frn_det.layers import FilterResponseNorm2d

STAGES = ("stem", "res2", "res3", "res4", "res5", "fpn", "head")
MISSED = "missed"


def stage_of(layer_name):
    """The part of a detectron2 FPN detector a module name lies in (STAGES), "other" elsewhere."""
    parts = layer_name.split(".")
    for stage in STAGES[:5]:
        if stage in parts:
            return stage
    if any(p.startswith("fpn_") for p in parts):
        return "fpn"
    return "head" if parts[0] in ("head", "roi_heads", "proposal_generator") else "other"


class NormInputStats:
    """Forward hooks on a model's FRN and GroupNorm layers that gather, while ``active``, per plane
    of each layer's input its nu2 / eps and mu^2 / nu2, and for FRN with a TLU its outputs at tau."""

    def __init__(self, model):
        self.active = False
        self.layers = {}  # name -> {"kind", "eps", "plane", "nu2_over_eps": [], "mean_share": [], "at_tau": [n, total]}
        self._handles = [m.register_forward_hook(self._hook(name, m)) for name, m in model.named_modules()
                         if isinstance(m, (FilterResponseNorm2d, nn.GroupNorm))]

    def _hook(self, name, module):
        kind = "GN" if isinstance(module, nn.GroupNorm) else "FRN"
        tau = getattr(module, "tau", None)

        def hook(_, inputs, output):
            if not self.active:
                return
            x = inputs[0].detach().double()
            nu2 = x.square().mean(dim=(2, 3)).flatten()
            mu2 = x.mean(dim=(2, 3)).square().flatten()
            rec = self.layers.setdefault(name, {"kind": kind, "eps": float(module.eps), "plane": tuple(x.shape[2:]),
                                                "nu2_over_eps": [], "mean_share": [], "at_tau": [0, 0]})
            rec["nu2_over_eps"].append((nu2 / module.eps).numpy())
            rec["mean_share"].append(torch.where(nu2 > 0, mu2 / nu2, torch.nan).numpy())
            if tau is not None:
                at = output.detach() == tau.detach().view(1, -1, 1, 1)
                rec["at_tau"][0] += int(at.sum())
                rec["at_tau"][1] += at.numel()
        return hook

    def rows(self, label):
        """One summary row per layer, in the model's module order."""
        out = []
        for index, (name, rec) in enumerate(self.layers.items()):
            ratio, share = np.concatenate(rec["nu2_over_eps"]), np.concatenate(rec["mean_share"])
            at, total = rec["at_tau"]
            out.append({"model": label, "index": index, "layer": name, "stage": stage_of(name), "kind": rec["kind"],
                        "plane": "x".join(map(str, rec["plane"])), "planes": ratio.size,
                        "median_nu2_over_eps": float(np.median(ratio)), "share_nu2_below_eps": float(np.mean(ratio < 1)),
                        "mean_share": float(np.nanmean(share)), "share_at_tau": at / total if total else float("nan")})
        return out

    def remove(self):
        for h in self._handles:
            h.remove()


@dataclass
class ObjectRecord:
    model: str
    image: int
    category: str
    share: float      # visible area / image area
    in_image: str     # detected as (a class or MISSED)
    alone: str


def object_box(mask):
    """COCO xywh box of a boolean mask (pixel corners)."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def detected_as(instances, boxes, score_thresh=0.3):
    """What each ground-truth box (xywh) is detected as in one image's detectron2 ``instances``."""
    keep = instances.scores >= score_thresh
    det = instances.pred_boxes.tensor[keep].numpy().astype(np.float64)
    det[:, 2:] -= det[:, :2]  # xyxy -> xywh
    classes = instances.pred_classes[keep].numpy()
    best = best_detections(det, instances.scores[keep].numpy(), boxes)
    return [CLASSES[classes[k]] if k >= 0 else MISSED for k in best]


def load_predictor(run_dir):
    """detectron2's DefaultPredictor for a finished run (config.yaml, model_final.pth), on the CPU."""
    from detectron2.engine import DefaultPredictor

    weights = os.path.join(run_dir, "model_final.pth")
    for path in (os.path.join(run_dir, "config.yaml"), weights):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: RUN_DIR must be a finished tools/train_net.py run")
    return DefaultPredictor(load_cfg(os.path.join(run_dir, "config.yaml"), ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"]))


def test_set_annotations(cfg):
    """The annotation file of a config's first test set (a registered synthetic set, generated if missing)."""
    from detectron2.data import MetadataCatalog

    name = cfg.DATASETS.TEST[0]
    if name not in SYNTHETIC_NAMES:
        raise ValueError(f"DATASETS.TEST[0] {name!r} is not one of the registered synthetic sets {sorted(SYNTHETIC_NAMES)}: "
                         "pass --val-json with the annotation file of a synthetic test set")
    ensure_synthetic([name])
    return MetadataCatalog.get(name).json_file


def diagnose(run_dir, label, num_images, val_json=None):
    """(layer rows, [ObjectRecord]) of one finished run on its test set's first ``num_images`` images."""
    predictor = load_predictor(run_dir)
    spec, split = spec_of(val_json or test_set_annotations(predictor.cfg))
    stats = NormInputStats(predictor.model)
    bgr = predictor.input_format == "BGR"
    records = []
    for index in tqdm(range(min(num_images, spec.num_images(split))), desc=f"diagnostics {label}", unit="img"):
        image, background, objects = render_scene(spec, split, index)
        if not objects:
            continue
        boxes = [object_box(visible) for _, visible, _ in objects]
        stats.active = True
        in_image = detected_as(_predict(predictor, image, bgr), boxes)
        stats.active = False
        for (cat, visible, _), box, named in zip(objects, boxes, in_image):
            alone = background.copy()
            alone[visible] = image[visible]
            records.append(ObjectRecord(label, index, CLASSES[cat - 1], float(visible.mean()), named,
                                        detected_as(_predict(predictor, alone, bgr), [box])[0]))
    stats.remove()
    return stats.rows(label), records


def _predict(predictor, rgb, bgr):
    with torch.no_grad():
        return predictor(np.ascontiguousarray(rgb[:, :, ::-1] if bgr else rgb))["instances"].to("cpu")


def share_bins(records):
    """Quartile edges of the objects' image shares (one model's objects: every model sees the same)."""
    return np.percentile([r.share for r in records], [25, 50, 75])


def by_share_quartile(records, edges):
    """``records`` split into the four quartiles of image share that ``edges`` (share_bins) bound."""
    quartile = [int(np.searchsorted(edges, r.share, side="left")) for r in records]
    return [[r for r, q in zip(records, quartile) if q == b] for b in range(4)]


def accuracy(records, where):
    return 100.0 * np.mean([getattr(r, where) == r.category for r in records]) if records else float("nan")


def summary_tables(layer_rows, records):
    """The markdown report: per model and stage the norm layers' input statistics; per model the objects'
    accuracy in the image and alone, their flips, and accuracy by class and by share of the image."""
    labels = list(dict.fromkeys(r.model for r in records)) or list(dict.fromkeys(r["model"] for r in layer_rows))
    lines = ["## Norm layers' inputs (full val images)", "",
             "Per stage, mean over its layers: median nu2 / eps of a plane, share of planes with nu2 < eps, "
             "mean share mu^2 / nu2 of the plane's mean square that is its squared mean, share of outputs at tau (FRN with TLU).", "",
             "| model | stage | layers | plane | median nu2 / eps | planes with nu2 < eps | mu^2 / nu2 | outputs at tau |",
             "|---|---|---|---|---|---|---|---|"]
    for label in labels:
        for stage in STAGES + ("other",):
            rows = [r for r in layer_rows if r["model"] == label and r["stage"] == stage]
            if rows:
                planes = sorted({r["plane"] for r in rows}, key=lambda p: -int(p.split("x")[0]))
                lines.append(f"| {label} | {stage} | {len(rows)} | {', '.join(planes)} | "
                             f"{np.mean([r['median_nu2_over_eps'] for r in rows]):.3g} | "
                             f"{100 * np.mean([r['share_nu2_below_eps'] for r in rows]):.1f}% | "
                             f"{np.mean([r['mean_share'] for r in rows]):.3f} | {_pct([r['share_at_tau'] for r in rows])} |")
    if not records:
        return "\n".join(lines) + "\n"
    edges = share_bins([r for r in records if r.model == labels[0]])
    bins = [f"<= {edges[0]:.3f}", f"<= {edges[1]:.3f}", f"<= {edges[2]:.3f}", f"> {edges[2]:.3f}"]
    lines += ["", "## Objects in their image and alone on their background", "",
              "Correctly named (share of objects, %); flips: named right alone and wrong in the image, and the reverse.", "",
              "| model | objects | in image | alone | right alone, wrong in image | wrong alone, right in image | missed in image / alone |",
              "|---|---|---|---|---|---|---|"]
    for label in labels:
        rs = [r for r in records if r.model == label]
        hurt = sum(r.alone == r.category != r.in_image for r in rs)
        helped = sum(r.in_image == r.category != r.alone for r in rs)
        lines.append(f"| {label} | {len(rs)} | {accuracy(rs, 'in_image'):.1f} | {accuracy(rs, 'alone'):.1f} | {hurt} | "
                     f"{helped} | {sum(r.in_image == MISSED for r in rs)} / {sum(r.alone == MISSED for r in rs)} |")
    lines += ["", "By class, in image / alone (%):", "", "| model | " + " | ".join(CLASSES) + " |",
              "|---" * (len(CLASSES) + 1) + "|"]
    for label in labels:
        cells = [_in_alone([r for r in records if r.model == label and r.category == c]) for c in CLASSES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "By the object's share of the image (quartiles of the objects' visible area / image area), "
              "in image / alone (%):", "", "| model | objects | " + " | ".join(bins) + " |", "|---" * (len(bins) + 2) + "|"]
    for label in labels:
        for what, keep in (("rectangles", lambda r: r.category == "rectangle"), ("all classes", lambda r: True)):
            rs = [r for r in records if r.model == label and keep(r)]
            cells = [_in_alone(q) for q in by_share_quartile(rs, edges)]
            lines.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _in_alone(rs):
    return f"{accuracy(rs, 'in_image'):.0f} / {accuracy(rs, 'alone'):.0f} (n={len(rs)})" if rs else "n/a"


def _pct(values):
    """Mean of the layers that have the value (FRN with a TLU), in %."""
    values = [v for v in values if not np.isnan(v)]
    return f"{100 * np.mean(values):.1f}% ({len(values)} layers)" if values else "n/a"


def plot(layer_rows, records, path):
    """Per layer in network order: mu^2 / nu2, outputs at tau, median nu2 / eps; and accuracy by share."""
    labels = list(dict.fromkeys(r["model"] for r in layer_rows))
    with figure(path, ncols=4, panel_size=(4.2, 3.4)) as (_, axes):
        for ax, key, title, log in ((axes[0][0], "mean_share", "mean share mu^2 / nu2 of a plane", False),
                                    (axes[0][1], "share_at_tau", "share of outputs at tau", False),
                                    (axes[0][2], "median_nu2_over_eps", "median nu2 / eps of a plane", True)):
            for label in labels:
                rows = [r for r in layer_rows if r["model"] == label]
                ax.plot([r["index"] for r in rows], [r[key] for r in rows], marker=".", lw=1, label=label)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("norm layer (network order)", fontsize=8)
            if log:
                ax.set_yscale("log")
        axes[0][0].legend(fontsize=7)
        ax = axes[0][3]
        if records:
            edges = share_bins([r for r in records if r.model == records[0].model])
            for i, label in enumerate(labels):  # the model's colour of the other panels; dashed: alone
                rs = [r for r in records if r.model == label]
                for where, style in (("in_image", "-"), ("alone", "--")):
                    ax.plot(range(4), [accuracy(q, where) for q in by_share_quartile(rs, edges)],
                            style, color=f"C{i}", marker="o", label=f"{label} {where.replace('_', ' ')}")
            ax.set_xticks(range(4), ["1st", "2nd", "3rd", "4th"])
            ax.legend(fontsize=7)
        ax.set_title("objects named right (%) by share of the image", fontsize=9)
        ax.set_xlabel("quartile of visible area / image area", fontsize=8)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="finished tools/train_net.py output folders")
    p.add_argument("--labels", nargs="+", help="one name per run (default: the folders' names)")
    p.add_argument("--num-images", type=int, default=100, help="first N images of the test set (default 100)")
    p.add_argument("--val-json", help="annotation file of the test set (default: the config's first test dataset)")
    p.add_argument("--out", required=True, help="output prefix: PREFIX.md, PREFIX_layers.csv, PREFIX_objects.csv, PREFIX.png")
    args = p.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        p.error(f"--labels: {len(labels)} names for {len(args.run_dirs)} runs")
    layer_rows, records = [], []
    for run_dir, label in zip(args.run_dirs, labels):
        rows, recs = diagnose(run_dir, label, args.num_images, args.val_json)
        layer_rows += rows
        records += recs
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_csv(f"{args.out}_layers.csv", layer_rows)
    if records:
        write_csv(f"{args.out}_objects.csv", [r.__dict__ for r in records])
    with open(f"{args.out}.md", "w") as f:
        f.write(f"# Diagnostics: {', '.join(f'{l} ({d})' for l, d in zip(labels, args.run_dirs))}\n\n"
                f"First {args.num_images} test images; `python -m experiments.cpu_grid.diagnostics`.\n\n")
        f.write(summary_tables(layer_rows, records))
    plot(layer_rows, records, f"{args.out}.png")
    print(open(f"{args.out}.md").read())


if __name__ == "__main__":
    main()

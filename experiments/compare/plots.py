"""The comparison's figures: AP against images per GPU, learning curves, learning-rate sweeps."""
import statistics

from frn_det.engine.plotting import figure, norm_color

from .stats import group_order, lr_sweep, none_ok_label

_VARIANT_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (3, 1, 1, 1, 1, 1)), "v"))  # line, marker


def plot(groups, path, task="bbox", metric="AP"):
    """AP against images per GPU, one line per norm (error bars: std over seeds; variants only where
    a family has no plain-norm runs), one panel per family. Returns the path."""
    fams = sorted({k[0] for k in groups})  # families with at least a run
    with figure(path, ncols=max(1, len(fams)), panel_size=(5.5, 4), dpi=90) as (_, axes):
        _plot_families(axes[0], fams, groups, task, metric)
    return path


def _plot_families(axes, fams, groups, task, metric):
    for ax, fam in zip(axes, fams):
        labels = sorted({k[1] for k in groups if k[0] == fam})
        # the base norms only, when there are any: sweeps and ablations have their own plots
        norms = [n for n in labels if " " not in n] or labels
        for norm in norms:
            pts = sorted(((k[2], g) for k, g in groups.items() if k[0] == fam and k[1] == norm
                          and (task, metric) in g["stats"]), key=lambda p: p[0])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1]["stats"][(task, metric)]["mean"] for p in pts]
            es = [p[1]["stats"][(task, metric)]["std"] for p in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=norm, color=norm_color(norm))
        # a cell whose runs all failed is a result (BN at batch 1 may fail); one still training is not
        failed = [(k, g) for k, g in groups.items() if k[0] == fam and k[1] in norms
                  and none_ok_label(g["runs"]) == "all failed"]
        for i, (k, g) in enumerate(sorted(failed, key=lambda kg: group_order(kg[0]))):
            ax.plot([k[2]], [0], marker="x", color=norm_color(k[1]), markersize=9, clip_on=False,
                    linestyle="none", label="all runs failed" if i == 0 else None)
            ax.annotate(f"{k[1]} failed", (k[2], 0), textcoords="offset points", xytext=(4, 4 + 10 * i), fontsize=8)
        ax.set_xscale("log", base=2)
        xs_all = sorted({k[2] for k in groups if k[0] == fam and k[2] is not None})
        ax.set_xticks(xs_all)
        ax.set_xticklabels([str(x) for x in xs_all])
        ax.set_xlabel("images per GPU")
        ax.set_ylabel(f"{task} {metric}")
        seeds = sorted({len(g["ok"]) for k, g in groups.items() if k[0] == fam and g["ok"]})
        n = "/".join(str(x) for x in seeds)
        ax.set_title(f"{fam}: mean ± std over {n} seed{'s' if seeds != [1] else ''}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(title="norm")


def plot_curves(runs, path, task="bbox"):
    """AP against images seen during training, one panel per (family, images per GPU), one line per
    norm (colour) and variant (line style): the mean over seeds at each evaluation, shaded between
    min and max."""
    cells = {}
    for r in runs:
        if r.status == "ok" and r.curve(task):
            label = (r.result["norm"], r.variant)
            cells.setdefault((r.family, r.result["images_per_gpu"]), {}).setdefault(label, []).append(r.curve(task))
    if not cells:
        return None
    keys = sorted(cells)
    many = max(len(cells[k]) for k in keys) > 4  # legends that would hide the lines go beside each panel
    variants = sorted({v for cell in cells.values() for _, v in cell})
    style = {v: _VARIANT_STYLES[i % len(_VARIANT_STYLES)] for i, v in enumerate(variants)}
    with figure(path, ncols=len(keys), panel_size=(6.4 if many else 4.2, 3.6), dpi=90, sharey=True,
                tight_bbox=True) as (_, axes):
        for ax, key in zip(axes[0], keys):
            _plot_curve_cell(ax, cells[key], key, style, many)
        axes[0][0].set_ylabel(f"{task} AP")
    return path


def _plot_curve_cell(ax, cell, key, style, many):
    for (norm, variant), curves in sorted(cell.items()):
        n = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(n)]
        vals = [[c[i][1] for c in curves] for i in range(n)]
        seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
        line, marker = style[variant]
        ax.plot(xs, [statistics.fmean(v) for v in vals], marker=marker, markersize=3, color=norm_color(norm),
                linestyle=line, label=f"{norm} {variant} ({seeds})".replace("  ", " "))
        ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=norm_color(norm), alpha=0.15)
    ax.set_title(f"{key[0]}, {key[1]} img/batch", fontsize=9)
    ax.set_xlabel("images seen")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7 if many else 8, **({"loc": "upper left", "bbox_to_anchor": (1.0, 1.0)} if many else {}))


def plot_lr_sweep(runs, path, task="bbox"):
    """Final AP against the base learning rate (log scale), one line per norm and batch size."""
    sweep = lr_sweep(runs, task)
    if not sweep:
        return None
    with figure(path, panel_size=(4.5, 3.5), dpi=90) as (_, axes):
        _plot_sweep(axes[0][0], sweep, task)
    return path


def _plot_sweep(ax, sweep, task):
    batches = sorted({batch for _, batch in sweep})
    for (norm, batch), pts in sweep.items():
        # one colour per norm, a line style per batch size
        style = ("-", "--", ":")[min(batches.index(batch), 2)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{norm} batch {batch}",
                color=norm_color(norm))
    ax.set_xscale("log")
    lrs = sorted({p[0] for pts in sweep.values() for p in pts})
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("base learning rate (per batch)")
    ax.set_ylabel(f"final {task} AP")
    ax.grid(True, alpha=0.3)
    ax.legend()

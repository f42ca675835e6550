"""The comparison's outputs for a set of runs: markdown table, CSVs and plots under one prefix."""
import os

from .plots import plot, plot_curves, plot_lr_sweep
from .stats import aggregate
from .tables import markdown, write_csv, write_runs_csv


def write_all(runs, out_prefix, expected=None, curve_runs=None):
    """Write PREFIX.md, PREFIX.csv (one row per run: RUN_COLUMNS), PREFIX_groups.csv (one row per
    group: statistics over seeds), PREFIX.png, and PREFIX_curves.png (of ``curve_runs`` when given:
    the same runs on another test dataset) / PREFIX_lr_sweep.png where the runs have curves / a
    sweep; return the groups."""
    d = os.path.dirname(out_prefix)
    if d:
        os.makedirs(d, exist_ok=True)
    groups = aggregate(runs)
    with open(out_prefix + ".md", "w") as f:
        f.write(markdown(groups, runs, expected))
    write_runs_csv(runs, out_prefix + ".csv")
    write_csv(groups, out_prefix + "_groups.csv")
    if groups:
        plot(groups, out_prefix + ".png")
    plot_curves(runs if curve_runs is None else curve_runs, out_prefix + "_curves.png")
    plot_lr_sweep(runs, out_prefix + "_lr_sweep.png")
    return groups



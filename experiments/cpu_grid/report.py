"""The CPU comparison's report (docs/results/): every run of the grid, and each part of it."""
import os

from ..compare.grid import run_dir_for
from ..compare.report import write_all
from ..compare.runs import find_runs, load_run
from .configs import GRID_DIR, parts


def collect(root, out_dir, log=print):
    """Every run under ``root`` (finished, failed or not finished) into out_dir/cpu_grid.*, and each
    of :func:`experiments.cpu_grid.configs.parts` into out_dir/<part>.*."""
    seed_of = find_runs(root)
    dirs = list(seed_of)
    runs = {d: load_run(d) for d in dirs}
    selected = {"cpu_grid": dirs}
    for name, (configs, seeds) in parts().items():
        wanted = {os.path.dirname(run_dir_for(root, os.path.join(GRID_DIR, c), 0)) for c in configs}
        selected[name] = [d for d in dirs if os.path.dirname(d) in wanted and (seeds is None or seed_of[d] in seeds)]
    for name, part in selected.items():
        if part:
            write_all([runs[d] for d in part], os.path.join(out_dir, name))
            ok = sum(runs[d].status == "ok" for d in part)
            log(f"{name}: {ok}/{len(part)} runs finished -> {os.path.join(out_dir, name)}.md, .csv, plots")

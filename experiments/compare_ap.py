"""Compare detection AP across norms and images per GPU.

Collect finished runs (directories holding the frn_det_result.json that tools/train_net.py
writes) into a markdown table, CSVs and a PNG plot of AP against images per GPU, one line per norm:

    python -m experiments.compare_ap collect output/run_a output/run_b ... --out output/compare/ap

or launch a grid of configs x seeds through tools/train_net.py first (--jobs at a time; resumable:
a run whose frn_det_result.json exists is skipped, an interrupted one resumes from its last
checkpoint), then collect it:

    python -m experiments.compare_ap grid --configs configs/a.yaml configs/b.yaml --seeds 0 1 \\
        --root output/grid --out output/grid/ap [--opts KEY VALUE ...]

The CPU comparison of docs/results.md (experiments/cpu_grid/run.sh runs it): every run under --root into
OUT_DIR/cpu_grid.* and each part (the grid with the Mask R-CNN pair, the ablations, the sweeps)
into OUT_DIR/cpu_grid_<part>.*:

    python -m experiments.compare_ap cpu-grid --root output/cpu_grid --out-dir docs/results

The BCCD comparison (experiments/bccd/run.sh runs it): the sweep and the curves on bccd_val, the
grid, study, noise and decision rule on bccd_test (experiments/bccd/report.py):

    python -m experiments.compare_ap bccd --root output/bccd_grid --out-dir docs/results

Outputs (PREFIX from --out): PREFIX.md (table + missing/failed runs), PREFIX.csv (one row per run,
with its status and reason), PREFIX_groups.csv (one row per group: mean, std, min, max of every
metric over seeds), PREFIX.png (AP against images per GPU) and, where the runs have them,
PREFIX_curves.png (learning curves) and PREFIX_lr_sweep.png. Run from the checkout's root; the
logic is experiments/compare/ (runs, stats, tables, plots, grid) and experiments/cpu_grid/report.py.
"""
import argparse
import sys

from .paths import TRAIN_NET


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("collect", help="collect existing run directories")
    c.add_argument("run_dirs", nargs="+")
    g = sub.add_parser("grid", help="launch configs x seeds through train_net (resumable), then collect")
    g.add_argument("--configs", nargs="+", required=True)
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    g.add_argument("--root", required=True, help="runs go to ROOT/<folder>_<config>/seed<k>")
    g.add_argument("--train-net", default=TRAIN_NET)
    g.add_argument("--timeout", type=float, default=None, help="seconds per run (default: none)")
    g.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads per run (OMP_NUM_THREADS)")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep a finished run's intermediate checkpoints")
    g.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    g.add_argument("--no-launch", action="store_true", help="only collect what the grid has so far")
    g.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE config overrides passed to every run (last argument)")
    for p in (c, g):
        p.add_argument("--out", required=True, help="output prefix: PREFIX.md/.csv/_groups.csv/.png")
    cg = sub.add_parser("cpu-grid", help="collect the CPU comparison of docs/results.md and each of its parts")
    cg.add_argument("--root", default="output/cpu_grid", help="where experiments/cpu_grid/run.sh puts the runs")
    cg.add_argument("--out-dir", default="docs/results")
    bc = sub.add_parser("bccd", help="collect the BCCD comparison of docs/results.md")
    bc.add_argument("--root", default="output/bccd_grid", help="where experiments/bccd/run.sh puts the runs")
    bc.add_argument("--out-dir", default="docs/results")
    args = ap.parse_args(argv)

    # Imported by mode: a dry run imports neither torch nor detectron2 (experiments.compare.grid).
    if args.mode == "cpu-grid":
        from .cpu_grid.report import collect as collect_cpu_grid

        collect_cpu_grid(args.root, args.out_dir)
        return 0
    if args.mode == "bccd":
        from .bccd.report import collect as collect_bccd

        collect_bccd(args.root, args.out_dir)
        return 0
    expected = None
    if args.mode == "collect":
        from .compare.runs import load_run

        runs = [load_run(d) for d in args.run_dirs]
    else:
        from .compare.grid import collect_grid, launch_grid

        if not args.no_launch:
            launch_grid(args.configs, args.seeds, args.root, args.opts, args.train_net,
                        dry_run=args.dry_run, timeout=args.timeout, jobs=args.jobs, threads=args.threads,
                        keep_checkpoints=args.keep_checkpoints)
        if args.dry_run:
            return 0
        runs, expected = collect_grid(args.configs, args.seeds, args.root)
    from .compare.report import write_all

    write_all(runs, args.out, expected)
    n_bad = sum(r.status != "ok" for r in runs)
    print(f"{len(runs) - n_bad}/{len(runs)} runs ok; wrote {args.out}.md, .csv, _groups.csv, .png")
    if n_bad:
        print(f"{n_bad} missing or failed: see {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

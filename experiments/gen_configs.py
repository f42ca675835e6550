"""Generate the config grids: configs/coco/ (norms x images per GPU, from scratch;
experiments/coco/configs.py) and the synthetic CPU comparison (configs/cpu_grid/,
configs/cpu_grid_short/; experiments/cpu_grid/grid.yaml rendered by experiments/cpu_grid/configs.py) and
the BCCD comparison (configs/bccd_grid/; experiments/bccd/grid.yaml, experiments/bccd/configs.py).
From the checkout's root:

    python -m experiments.gen_configs            # (re)write every generated config
    python -m experiments.gen_configs --check    # exit 1 if the committed files differ from the output

tests/test_configs.py checks that the committed YAMLs equal the generator's output, so edit the
generator (or grid.yaml) and re-run this instead of editing the YAMLs by hand.
"""
import argparse
import os
import sys

from .bccd import configs as bccd
from .coco import configs as coco
from .cpu_grid import configs as cpu_grid
from .generated import diff, write

TARGETS = coco.TARGETS + cpu_grid.TARGETS + bccd.TARGETS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    if args.check:
        bad = [os.path.join(d, b) for d, render in TARGETS for b in diff(d, render)]
        for b in bad:
            print(b)
        return 1 if bad else 0
    for out_dir, render in TARGETS:
        print(f"wrote {write(out_dir, render)} files under {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Generate the synthetic COCO-format instance-segmentation dataset.

    python tools/make_synthetic_coco.py                      # the default dataset, default root
    python tools/make_synthetic_coco.py --root /tmp/shapes --num-train 50 --mask-format rle
    python tools/make_synthetic_coco.py --root datasets/frn_synthetic_clutter --clutter 12 --texture 24   # the cluttered task

Writes ROOT/{train,val}/*.png and ROOT/annotations/instances_{train,val}.json. The default ROOT
is where `import frn_det` registers frn_synthetic_train / frn_synthetic_val: $FRN_DET_DATA, else
$DETECTRON2_DATASETS/frn_synthetic (DETECTRON2_DATASETS defaults to ./datasets). A root that
already holds a dataset generated with the same arguments is left as it is.
"""
import argparse
import dataclasses

from frn_det.data.register import default_synthetic_root
from frn_det.data.synthetic import SPLITS, SyntheticSpec, generate_split, is_generated


def main(argv=None):
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=default_synthetic_root(), help="output folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="regenerate even if ROOT is up to date")
    for field in dataclasses.fields(SyntheticSpec):
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            kwargs = {"action": argparse.BooleanOptionalAction}
        else:
            kwargs = {"type": type(default)}
            if field.name == "mask_format":
                kwargs["choices"] = ("polygon", "rle")
        parser.add_argument("--" + field.name.replace("_", "-"), default=default, help="default: %(default)s", **kwargs)
    args = parser.parse_args(argv)
    spec_args = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSpec)}
    try:
        spec = SyntheticSpec(**spec_args)
    except ValueError as e:
        parser.error(str(e))
    if is_generated(args.root, spec) and not args.force:
        print(f"{args.root} already holds this dataset (use --force to regenerate)")
        return
    for split in SPLITS:
        path = generate_split(spec, args.root, split)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

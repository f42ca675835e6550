#!/usr/bin/env bash
# The wheels detectron2 needs on the GPU machine, fetched here (it has no package registry).
#
# The device machines have Python 3.12, torch 2.11, numpy 2, matplotlib, pillow, tabulate,
# cloudpickle, portalocker, tqdm, pyyaml and tensorboard, and lack detectron2 and what only it
# needs. This writes those wheels into WHEELHOUSE (default .whl/, git-ignored; about 10 MB, inside the
# 64 MiB a device call carries), at the versions this checkout's environment runs:
#   - detectron2: the sal-detectron2 wheel of the README's recipe (sha256-checked, renamed to
#     py3-none-any; its _C for CPython 3.10 is not loaded on 3.12, as on 3.11 here);
#   - fvcore, iopath, yacs, termcolor, omegaconf, hydra-core, antlr4-python3-runtime (pure Python;
#     the two with no wheel on the registry, fvcore and antlr4, are built into one here);
#   - pycocotools for CPython 3.12 manylinux x86-64.
# No numpy: detectron2 trains and evaluates (Mask R-CNN, boxes and masks) with numpy 2 (checked on
# the CPU with numpy 2.4.6), though its metadata asks for numpy<2; installing --no-deps keeps the
# machine's numpy. tools/gpu_check.sh installs WHEELHOUSE into a folder on PYTHONPATH when it is there.
#
#   tools/gpu_wheelhouse.sh [WHEELHOUSE]        then: run(..., carry=[".whl"]) with tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
D2_WHEEL=sal_detectron2-0.7.2-cp310-none-any.whl
D2_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561
PURE="fvcore iopath yacs termcolor omegaconf hydra-core antlr4-python3-runtime"
BINARY="pycocotools"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }
version() {  # the version this environment runs, so that the device runs what was tested here
  "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
pip download --no-deps --only-binary=:all: --python-version 3.10 -d "$DEST" sal-detectron2==0.7.2
echo "$D2_SHA256  $DEST/$D2_WHEEL" | sha256sum -c --quiet -
mv "$DEST/$D2_WHEEL" "$DEST/sal_detectron2-0.7.2-py3-none-any.whl"
for name in $PURE; do
  spec="$name==$(version "$name")"
  # a py3 wheel where the registry has one, else one built here from the source distribution
  pip download --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" "$spec" 2>/dev/null \
    || pip wheel --no-deps --no-build-isolation -w "$DEST" "$spec"
done
for name in $BINARY; do
  pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$name==$(version "$name")"
done
echo "[gpu_wheelhouse] $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST:"
ls "$DEST"

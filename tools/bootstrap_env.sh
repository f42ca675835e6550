#!/usr/bin/env bash
# Idempotent environment set-up behind `make demo` / `make test`.
# Creates $VENV (Python 3.11) unless PYTHON names an existing interpreter, then installs only what is
# missing: torch + torchvision, detectron2 (verified wheel recipe, skipped when detectron2 already
# imports), build tools, frn-det itself (rebuilt only when its C++/CUDA sources change), test deps.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
D2_WHEEL=sal_detectron2-0.7.2-cp310-none-any.whl
D2_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561
VENV=${VENV:-.venv}
WHEELS=.cache/wheels

if [ -z "${PYTHON:-}" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating $VENV"
    python3.11 -m venv "$VENV"
  fi
  PYTHON="$VENV/bin/python"
fi
pip() { "$PYTHON" -m pip --disable-pip-version-check -q "$@"; }
imports() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

if ! "$PYTHON" -c 'import setuptools, sys; v = tuple(int(p) for p in setuptools.__version__.split(".")[:2]); sys.exit(not (77, 0) <= v < (81, 0))' 2>/dev/null \
   || ! imports wheel; then
  echo "[bootstrap] installing setuptools>=77,<81 and wheel"
  pip install 'setuptools>=77,<81' wheel
fi

if ! imports "torch, torchvision"; then
  echo "[bootstrap] installing $TORCH_PINS (several GB, a few minutes)"
  pip install $TORCH_PINS
fi

if ! imports detectron2; then
  echo "[bootstrap] installing detectron2 (sal-detectron2 0.7.2 wheel, sha256-checked)"
  mkdir -p "$WHEELS"
  [ -f "$WHEELS/$D2_WHEEL" ] || pip download --no-deps --only-binary=:all: --python-version 3.10 -d "$WHEELS" sal-detectron2==0.7.2
  echo "$D2_SHA256  $WHEELS/$D2_WHEEL" | sha256sum -c --quiet -
  cp "$WHEELS/$D2_WHEEL" "$WHEELS/sal_detectron2-0.7.2-py3-none-any.whl"
  # The wheel's metadata omits two of upstream detectron2's requirements; pin them as upstream does.
  pip install "$WHEELS/sal_detectron2-0.7.2-py3-none-any.whl" 'fvcore>=0.1.5,<0.1.6' 'iopath>=0.1.7,<0.1.10'
fi

# Compile the CUDA sources whenever a toolkit is present, so CI catches CUDA compile errors.
if [ -z "${FORCE_CUDA:-}" ] && command -v nvcc >/dev/null 2>&1; then
  export FORCE_CUDA=1
  # The toolkit root: /usr/local/cuda where present (nvcc on PATH may be a wrapper script elsewhere).
  if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
    else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); fi
  fi
  export CUDA_HOME
  # Without a GPU nothing tells torch which arch to build: SASS for Turing, Ampere and Hopper (CUDA
  # 13 has no sm_70; sm_80 code runs on every 8.x card, Ada included) and PTX for the newest, so the
  # build runs on users' GPUs, newer ones included; three archs, not five, to keep the build short.
  # With a GPU, torch targets the visible card.
  if ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-7.5;8.0;9.0+PTX}
  fi
fi

stamp_file="$("$PYTHON" -c 'import sys; print(sys.prefix)')/frn_det_build.stamp"
stamp="$(cat setup.py $(find frn_det/layers/csrc -type f | sort) | sha256sum | cut -d' ' -f1) force_cuda=${FORCE_CUDA:-0} archs=${TORCH_CUDA_ARCH_LIST:-detected}"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] || ! imports frn_det._C; then
  echo "[bootstrap] building frn-det (FORCE_CUDA=${FORCE_CUDA:-0}); the first build takes a few minutes"
  rm -rf build
  # Unlink the old library instead of letting the build overwrite it in place: processes still
  # running it (a training grid in the background) keep their copy.
  rm -f frn_det/_C.*.so
  # --use-pep517: setuptools 80 turned the legacy `develop` path into an isolated pip build without torch.
  MAX_JOBS=${MAX_JOBS:-2} pip install --use-pep517 --no-build-isolation --no-deps -e .
  echo "$stamp" >"$stamp_file"
fi

if ! imports "pytest, pytest_timeout, xdist, matplotlib, tqdm, pycocotools, cv2, hypothesis, onnx, onnxruntime, onnxscript"; then
  echo "[bootstrap] installing test and tool dependencies"
  # opencv: detectron2's Visualizer (make demo's pictures); onnx / onnxruntime: the export tests.
  # These versions install beside detectron2's numpy<2 (an unpinned opencv pulls numpy 2).
  pip install pytest pytest-timeout pytest-xdist matplotlib tqdm pycocotools hypothesis 'numpy<2' 'opencv-python-headless<4.11' \
    'onnx==1.23.*' 'onnxruntime==1.32.*' 'onnxscript==0.7.*'
fi

#!/usr/bin/env bash
# Verify and benchmark frn-det's CUDA kernels on a GPU machine, in one command, into one report.
#
# For a bare GPU machine with torch but no detectron2 and no package index (the project's device
# machines: Python 3.12, torch 2.11, CUDA 13, timm, compute-sanitizer; ../shared/reference/
# environment.md). Steps, each timed and recorded in the report:
#   1. build frn_det._C in place against that torch (torch targets the visible GPU);
#   2. the op and layer tests with FRN_DET_REQUIRE_CUDA=1 (a CUDA test that cannot run fails);
#   3. compute-sanitizer memcheck (every dtype) and racecheck (fp32) over every CUDA kernel path
#      (tests/kernel_paths.py exercise: each path, layout and option, capped grids, int64);
#   4. python -m benchmarks.benchmark_frn on the R50-FPN shapes, fp32 / fp16 / bf16, NCHW and channels_last:
#      op vs eager and compiled reference, timm's FilterResponseNormTlu2d, BatchNorm2d+ReLU,
#      GroupNorm+ReLU; time, GB/s and % of a device copy measured in the same run;
#   5. its --profile on a large and a small map: the op's and BatchNorm+ReLU's wall time against
#      their kernel time, and torch.profiler's top events (where the op's time goes).
# Without a GPU it is a dry run of the same steps on the CPU (CI runs it): the build is checked
# (built already: reused), the tests run without the CUDA requirement, the path script runs on the
# CPU without sanitizer, and the benchmark is a short CPU one.
#
#   tools/gpu_check.sh [REPORT]    REPORT defaults to $OUT/gpu_check.md when $OUT is set, else gpu_check.md
#   PYTHON=python3.12 tools/gpu_check.sh
# Exit status 1 when a step failed (the report says which). Plan: under 8 minutes (the full run on an
# H200 on 2026-11-26, every step passing, took 5 min 45 s).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REPORT=${1:-${OUT:+$OUT/}gpu_check.md}
LOGS=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
failed=0

# step NAME LOG COMMAND...: runs the command into LOG, adds a summary row, records a failure.
step() {
  local name=$1 log=$2 start=$SECONDS rc
  shift 2
  echo "[gpu_check] $name" >&2
  "$@" >"$LOGS/$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then echo "| $name | ok | $((SECONDS - start)) s |" >>"$LOGS/summary"
  else echo "| $name | **FAILED** (exit $rc, log below) | $((SECONDS - start)) s |" >>"$LOGS/summary"; failed=1; fi
  return $rc
}

quiet() {  # a step's log without Python's and torch's warnings
  grep -v -E 'Warning|warnings\.warn|^W[0-9]{4} ' "$LOGS/$1" || true
}

tail_of() {  # tail_of LOG N: the last N lines of a step's log as a code block
  printf '```\n%s\n```\n' "$(quiet "$1" | tail -n "$2")"
}

: >"$LOGS/summary"
if [ "$GPU" = 1 ]; then
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  step "build (in place, CUDA)" build.log env FORCE_CUDA=1 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
  # With pytest-xdist (the device machines have it) a test that crashes the interpreter fails alone,
  # instead of ending the run, and the tests take half the time.
  xdist=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8")
  step "tests (FRN_DET_REQUIRE_CUDA=1)" tests.log env FRN_DET_REQUIRE_CUDA=1 "$PY" -m pytest -q -rfE -p no:cacheprovider -p no:warnings \
    $xdist tests/test_frn_op.py tests/test_frn_layer.py
  if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
      dtypes="torch.float32, torch.float16, torch.bfloat16, torch.float64"
      [ "$tool" = racecheck ] && dtypes="torch.float32,"
      step "compute-sanitizer $tool" "$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 1 \
        "$PY" -c "import torch; import sys; sys.path.insert(0, 'tests'); from kernel_paths import exercise; print(exercise('cuda', ($dtypes)), 'op calls')"
    done
  else
    echo "| compute-sanitizer | **not found** | |" >>"$LOGS/summary"; failed=1
  fi
  step "benchmark" bench.log "$PY" -m benchmarks.benchmark_frn --device cuda --dtype float32 float16 bfloat16 \
    --layout both --shapes all --iters 10 --copy-bandwidth
  step "profile" profile.log "$PY" -m benchmarks.benchmark_frn --device cuda --dtype float32 --shapes fpn_p2,fpn_p6 \
    --iters 10 --profile
else
  step "build (dry run: reuse the built extension, else build the CPU one)" build.log \
    "$PY" -c "import frn_det.layers.ops as o, sys; sys.exit(0 if o.is_available() else 1)" \
    || step "build (in place, CPU)" build.log "$PY" setup.py build_ext --inplace
  # make test runs these files already: the dry run only checks that the GPU run's selection collects
  step "tests (dry run: collected, not run)" tests.log "$PY" -m pytest -q -p no:cacheprovider -p no:warnings \
    --collect-only tests/test_frn_op.py tests/test_frn_layer.py
  step "kernel paths on the CPU (dry run: no sanitizer)" memcheck.log \
    "$PY" -c "import torch; import sys; sys.path.insert(0, 'tests'); from kernel_paths import exercise; print(exercise('cpu', (torch.float32,)), 'op calls')"
  step "benchmark (dry run: CPU, 2 shapes)" bench.log "$PY" -m benchmarks.benchmark_frn --device cpu --dtype float32 \
    --layout both --shapes fpn_p6,box_head --iters 2 --copy-bandwidth
  step "profile (dry run: CPU, 1 shape)" profile.log "$PY" -m benchmarks.benchmark_frn --device cpu --dtype float32 \
    --shapes fpn_p6 --iters 2 --profile
fi

{
  echo "# frn-det GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$([ "$GPU" = 1 ] || echo ', DRY RUN (no GPU visible)')"
  echo
  "$PY" - <<'PY'
import os, platform, shutil, subprocess, sysconfig, torch
from frn_det.layers import build_info
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
print(f"- device: {dev}" + (f" (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))})" if torch.cuda.is_available() else ""))
print(f"- python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
cxx = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension builds with
path = shutil.which(cxx)
version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.partition("\n")[0] if path else "not found"
print(f"- C++ compiler: {path or cxx} ({version}); Python's link flags: {sysconfig.get_config_var('LDSHARED')}")
try:
    print(f"- frn_det._C kernels: {build_info.cuda_archs()}")
except FileNotFoundError as e:
    print(f"- frn_det._C: {e}")
PY
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  cat "$LOGS/summary"
  echo
  echo "## Tests"
  tail_of tests.log 15
  for tool in memcheck racecheck; do
    [ -f "$LOGS/$tool.log" ] && { echo; echo "## $tool"; tail_of "$tool.log" 8; }
  done
  [ -f "$LOGS/build.log" ] && grep -q . "$LOGS/build.log" && [ "$failed" = 1 ] && { echo; echo "## Build log (end)"; tail_of build.log 30; }
  echo
  echo "## Benchmark"
  quiet bench.log | grep -v '^  done' || true
  echo
  echo "## Profile"
  quiet profile.log | grep -v -E '^  profiled|^USDT|^ERROR.*gpuGetDeviceCount' || true
} >"$REPORT"
echo "[gpu_check] report: $REPORT" >&2
exit $failed

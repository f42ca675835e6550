#!/usr/bin/env bash
# Verify and benchmark frn-det on a GPU machine, in one command, into one report.
#
# For a bare GPU machine with torch but no detectron2 and no package index (the project's device
# machines: Python 3.12, torch 2.11, CUDA 13, numpy 2, compute-sanitizer; ../shared/reference/
# environment.md). Steps, in the order that matters most if the call is cut short, each under its
# own timeout; the report is rewritten after every step, so a cut run still reports what finished:
#   1. install the wheels of $WHEELHOUSE (default .whl/; tools/gpu_wheelhouse.sh: detectron2 and what
#      only it needs) into a folder on PYTHONPATH, when they were carried; then, in the background
#      while the next steps run, make demo's synthetic dataset is generated;
#   2. build frn_det._C in place against that torch (torch targets the visible GPU);
#   3. the op and layer tests with FRN_DET_REQUIRE_CUDA=1 (a CUDA test that cannot run fails);
#   4. detectron2 training iterations (python -m benchmarks.benchmark_step): RetinaNet and Mask R-CNN
#      R50-FPN, two 800x1333 images, BN / GN / FRN op / FRN op with resident planes (opt-in CUDA
#      kernels, ops.cuda_resident_planes) / FRN reference / the centred variant (the study's answer:
#      GroupNorm's kernel with C groups, then the TLU), AMP off and on (detectron2's SimpleTrainer /
#      AMPTrainer), interleaved; median, range, ratio to BN, step memory;
#   5. a short real training: make demo's FRN RetinaNet (configs/synthetic/retinanet_R18_FPN_FRN.yaml,
#      1900 iterations, then COCO evaluation) with tools/train_net.py on the GPU, AMP off and on at
#      once, against the box AP make demo measured on the CPU (README);
#   6. compute-sanitizer memcheck (every dtype) over every CUDA kernel path (tests/kernel_paths.py,
#      the resident planes' included);
#   7. python -m benchmarks.benchmark_frn on the R50-FPN shapes, NCHW and channels_last, in fp32 and
#      in fp16 and bf16 as AMP runs them (--amp: fp32 parameters, autocast): op, reference,
#      BatchNorm2d+ReLU, GroupNorm+ReLU per call (no torch.compile: its compilations cost minutes),
#      time, GB/s and % of a device copy in the same run; then op, BN and GN in kernel time (CUDA
#      graph replays: the host out of it); then the op against its memory floor in kernel time; the
#      op each time with the default kernels and with resident planes (--kernels default resident);
#   8. compute-sanitizer racecheck (fp32) over the same paths; 9. the --profile of a large and a small map.
# Without a GPU it is a dry run of the same steps on the CPU at tiny sizes (CI runs it): the built
# extension is reused, the tests are collected, the paths run without sanitizer, the training
# benchmark times R18 on 64x96 images (AMP is skipped: AMPTrainer needs CUDA), the short training
# runs 4 iterations on a tiny dataset, and the op benchmarks are short CPU ones (per call: kernel
# time needs CUDA graphs).
#
#   tools/gpu_check.sh [REPORT]    REPORT defaults to $OUT/gpu_check.md when $OUT is set, else gpu_check.md
#   PYTHON=python3.12 tools/gpu_check.sh
#   GPU_CHECK_SKIP="tests memcheck bench kbench floor racecheck profile" tools/gpu_check.sh   # a second try of
#     what failed, within the lease: steps named by their log (tests, step, train, memcheck, bench, ...)
# Exit status 1 when a step failed (the report says which). Plan on an H200: about 9.5 minutes for
# every step (estimated from the steps' times on 2026-12-04, docs/gpu.md, plus the kernel-time steps
# and the resident kernels' tests, sanitizer runs and benchmark rows, none yet run), about 6 with
# GPU_CHECK_SKIP="step train" (the kernel issue's steps alone), so that a second try of what failed
# fits in a 15-minute lease.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-.whl}
REPORT=${1:-${OUT:+$OUT/}gpu_check.md}
STEP_JSON=$(dirname "$REPORT")/gpu_check_step.json
LOGS=$(mktemp -d)
mkdir -p "$(dirname "$REPORT")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
failed=0

quiet() {  # a step's log without Python's and torch's warnings (each with its indented source line)
  awk '/Warning|^W[0-9][0-9][0-9][0-9] / { warned = 1; next } warned && /^  / { warned = 0; next } { warned = 0; print }' "$LOGS/$1"
}

tail_of() {  # tail_of LOG N: the last N lines of a step's log as a code block
  printf '```\n%s\n```\n' "$(quiet "$1" | tail -n "$2")"
}

section() {  # section TITLE LOG [N]: the step's log (its last N lines as a code block), if it ran
  [ -f "$LOGS/$2" ] || return 0
  echo; echo "## $1"
  if [ -n "${3:-}" ]; then tail_of "$2" "$3"; else quiet "$2" | grep -v -E '^  (done|profiled)|^USDT|^ERROR.*gpuGetDeviceCount'; fi
}

write_report() {
  {
    echo "# frn-det GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT$([ "$GPU" = 1 ] || echo ', DRY RUN (no GPU visible)')"
    echo
    cat "$LOGS/machine" 2>/dev/null
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    cat "$LOGS/summary"
    section "Wheels" wheels.log 12
    section "Tests" tests.log 15
    grep -q '^| build.*FAILED' "$LOGS/summary" && section "Build log (end)" build.log 30
    section "Training step (detectron2)" step.log
    section "Short training (tools/train_net.py)" train.log
    section "memcheck" memcheck.log 8
    section "Benchmark (per call)" bench.log
    section "Benchmark (kernel time)" kbench.log
    section "Memory floor" floor.log
    section "racecheck" racecheck.log 8
    section "Profile" profile.log
  } >"$REPORT"
}

# step NAME LOG TIMEOUT_S COMMAND...: runs the command into LOG under a timeout, adds a summary row,
# records a failure and rewrites the report.
step() {
  local name=$1 log=$2 limit=$3 start=$SECONDS rc
  shift 3
  case " ${GPU_CHECK_SKIP:-} " in *" ${log%.log} "*)
    echo "| $name | skipped (GPU_CHECK_SKIP) | |" >>"$LOGS/summary"; write_report; return 0;; esac
  echo "[gpu_check] $name" >&2
  # through bash -c: a step can be one of this script's functions (exported below)
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >"$LOGS/$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then echo "| $name | ok | $((SECONDS - start)) s |" >>"$LOGS/summary"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "| $name | **FAILED** (over its $limit s limit, log below) | $((SECONDS - start)) s |" >>"$LOGS/summary"; failed=1
  else echo "| $name | **FAILED** (exit $rc, log below) | $((SECONDS - start)) s |" >>"$LOGS/summary"; failed=1; fi
  write_report
  return $rc
}

install_wheels() {  # the carried wheelhouse into a target folder (no index, no dependencies resolved)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "$WHEELHOUSE"/*.whl \
    && ls "$WHEELHOUSE" && PYTHONPATH="$PYTHONPATH:$1" "$PY" -c 'import detectron2, numpy; print("detectron2", detectron2.__version__, "from", detectron2.__file__, "with numpy", numpy.__version__)'
}

# short_training DATA DEVICE MAX_ITER RUN...: make demo's FRN RetinaNet on the dataset under DATA
# (generated by the background job), each RUN (fp32, amp) at once; prints each run's box AP.
short_training() {
  local data=$1 device=$2 max_iter=$3 pids=() run
  shift 3
  until [ -e "$LOGS/data.done" ]; do sleep 1; done  # the background job's
  [ "$(cat "$LOGS/data.done")" = 0 ] || { echo "dataset generation failed:"; cat "$LOGS/data.log"; return 1; }
  for run in "$@"; do
    "$PY" tools/train_net.py --config-file configs/synthetic/retinanet_R18_FPN_FRN.yaml \
      --dataset gpu_check_train "$data/annotations/instances_train.json" "$data/train" \
      --dataset gpu_check_val "$data/annotations/instances_val.json" "$data/val" \
      DATASETS.TRAIN "('gpu_check_train',)" DATASETS.TEST "('gpu_check_val',)" MODEL.DEVICE "$device" \
      SOLVER.AMP.ENABLED "$([ "$run" = amp ] && echo True || echo False)" OUTPUT_DIR "$LOGS/train_$run" \
      $([ "$max_iter" = demo ] || echo "SOLVER.MAX_ITER $max_iter SOLVER.STEPS (2,3) SOLVER.WARMUP_ITERS 1 INPUT.MIN_SIZE_TRAIN (64,) INPUT.MAX_SIZE_TRAIN 64 INPUT.MIN_SIZE_TEST 64 INPUT.MAX_SIZE_TEST 64 DATALOADER.NUM_WORKERS 0") \
      >"$LOGS/train_$run.log" 2>&1 &
    pids+=($!)
  done
  local rc=0 i=0
  for run in "$@"; do
    wait "${pids[$i]}" || { rc=1; echo "run $run failed:"; quiet "train_$run.log" | tail -n 25; }
    i=$((i + 1))
  done
  "$PY" - "$LOGS" "$@" <<'PY'
import json, os, sys
logs, runs = sys.argv[1], sys.argv[2:]
print("| run | box AP | AP50 | AP75 | train+eval s |\n|---|---|---|---|---|")
for run in runs:
    path = os.path.join(logs, f"train_{run}", "frn_det_result.json")
    if os.path.exists(path):
        r = json.load(open(path))
        ap = r["results"]["bbox"]
        print(f"| FRN {'AMP (fp16)' if run == 'amp' else 'fp32'} | {ap['AP']:.1f} | {ap['AP50']:.1f} | {ap['AP75']:.1f} | {r['wall_time_s']:.0f} |")
    else:
        print(f"| FRN {run} | no result | | | |")
PY
  [ "$max_iter" = demo ] && echo && echo "make demo on the CPU (README, the same config, seed and dataset): FRN box AP 23.1 / AP50 35.4 / AP75 28.0"
  return $rc
}

: >"$LOGS/summary"
"$PY" - >"$LOGS/machine" 2>&1 <<'PY'
import os, platform, shutil, subprocess, sysconfig, torch
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
print(f"- device: {dev}" + (f" (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))})" if torch.cuda.is_available() else ""))
print(f"- python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
cxx = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension builds with
path = shutil.which(cxx)
version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.partition("\n")[0] if path else "not found"
print(f"- C++ compiler: {path or cxx} ({version}); Python's link flags: {sysconfig.get_config_var('LDSHARED')}")
PY

DATA=$LOGS/synthetic
make_data() {  # the synthetic dataset under DATA (ARGS: its spec), then its exit status into data.done
  "$PY" tools/make_synthetic_coco.py --root "$DATA" "$@" >"$LOGS/data.log" 2>&1
  echo $? >"$LOGS/data.done"
}
paths_code() {  # paths_code DEVICE DTYPES: Python that runs every kernel path (tests/kernel_paths.py)
  echo "import torch, sys; sys.path.insert(0, 'tests'); from kernel_paths import exercise; print(exercise('$1', ($2)), 'op calls')"
}
paths() {  # paths TOOL DTYPES: every CUDA kernel path under compute-sanitizer TOOL
  compute-sanitizer --tool "$1" --error-exitcode 1 "$PY" -c "$(paths_code cuda "$2")"
}
fp32_and_amp() {  # fp32_and_amp ARGS...: benchmark_frn in fp32, then in fp16 and bf16 as AMP runs them
  "$PY" -m benchmarks.benchmark_frn --dtype float32 "$@" && "$PY" -m benchmarks.benchmark_frn --dtype float16 bfloat16 --amp "$@"
}
export PY LOGS WHEELHOUSE
export -f quiet install_wheels short_training paths_code paths fp32_and_amp  # before the first step: steps run in bash -c
if ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then
  SITE=$(mktemp -d)
  step "wheels (into a PYTHONPATH folder)" wheels.log 120 install_wheels "$SITE"
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
if [ "$GPU" = 1 ]; then
  # make demo's dataset, while the build and the tests run (about a minute of one CPU core)
  make_data &
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  step "build (in place, CUDA)" build.log 240 env FORCE_CUDA=1 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace
  # With pytest-xdist (the device machines have it) a test that crashes the interpreter fails alone,
  # instead of ending the run, and the tests take a fraction of the time.
  xdist=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8")
  step "tests (FRN_DET_REQUIRE_CUDA=1)" tests.log 300 env FRN_DET_REQUIRE_CUDA=1 "$PY" -m pytest -q -rfE -p no:cacheprovider -p no:warnings \
    $xdist tests/test_frn_op.py tests/test_frn_layer.py
  step "training step benchmark (R50-FPN, 2x800x1333, AMP off/on)" step.log 300 "$PY" -m benchmarks.benchmark_step \
    --models retinanet mask_rcnn --depth 50 --size 800 1333 --device cuda --amp off on --warmup 3 --iters 8 --json "$STEP_JSON" \
    --variants BN GN "FRN (op)" "FRN (op, resident)" "FRN (reference)" "FRN centred (reference)"
  step "short training (FRN RetinaNet, make demo's schedule, fp32 and AMP)" train.log 300 short_training "$DATA" cuda demo fp32 amp
  sanitizer=$(command -v compute-sanitizer || true)
  [ -n "$sanitizer" ] || { echo "| compute-sanitizer | **not found** | |" >>"$LOGS/summary"; failed=1; }
  [ -n "$sanitizer" ] && step "compute-sanitizer memcheck" memcheck.log 180 paths memcheck "torch.float32, torch.float16, torch.bfloat16, torch.float64"
  step "op benchmark (per call; fp32, AMP fp16 / bf16)" bench.log 180 fp32_and_amp --device cuda --layout both \
    --shapes all --iters 10 --copy-bandwidth --methods op reference BatchNorm2d+ReLU GroupNorm32+ReLU --kernels default resident
  step "op benchmark (kernel time; fp32, AMP fp16 / bf16)" kbench.log 240 fp32_and_amp --device cuda --layout both \
    --shapes all --iters 10 --kernel-time --methods op BatchNorm2d+ReLU GroupNorm32+ReLU --kernels default resident
  step "op memory floor (kernel time; fp32, AMP fp16 / bf16)" floor.log 180 fp32_and_amp --device cuda --layout both \
    --shapes all --iters 10 --kernel-time --memory-floor --kernels default resident
  [ -n "$sanitizer" ] && step "compute-sanitizer racecheck" racecheck.log 180 paths racecheck "torch.float32,"
  step "profile" profile.log 60 "$PY" -m benchmarks.benchmark_frn --device cuda --dtype float32 --shapes fpn_p2,fpn_p6 \
    --iters 10 --profile
else
  make_data --num-train 4 --num-val 2 --image-size 64 --min-size 8 --max-size 21 &
  step "build (dry run: reuse the built extension, else build the CPU one)" build.log 60 \
    "$PY" -c "import frn_det.layers.ops as o, sys; sys.exit(0 if o.is_available() else 1)" \
    || step "build (in place, CPU)" build.log 900 "$PY" setup.py build_ext --inplace
  # make test runs these files already: the dry run only checks that the GPU run's selection collects
  step "tests (dry run: collected, not run)" tests.log 120 "$PY" -m pytest -q -p no:cacheprovider -p no:warnings \
    --collect-only tests/test_frn_op.py tests/test_frn_layer.py
  step "training step benchmark (dry run: R18, 2x64x96, CPU)" step.log 300 "$PY" -m benchmarks.benchmark_step \
    --models retinanet mask_rcnn --depth 18 --size 64 96 --device cpu --amp off on --warmup 1 --iters 1 --json "$STEP_JSON" \
    MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 32 MODEL.RPN.POST_NMS_TOPK_TRAIN 64 MODEL.ROI_BOX_HEAD.FC_DIM 64
  step "short training (dry run: 4 iterations, tiny dataset, CPU)" train.log 300 short_training "$DATA" cpu 4 fp32
  step "kernel paths on the CPU (dry run: no sanitizer)" memcheck.log 120 \
    "$PY" -c "$(paths_code cpu "torch.float32,")"
  step "op benchmark (dry run: CPU, 2 shapes, fp32 and AMP)" bench.log 120 fp32_and_amp --device cpu --layout both \
    --shapes fpn_p6,box_head --iters 2 --copy-bandwidth --methods op reference BatchNorm2d+ReLU GroupNorm32+ReLU
  echo "| op benchmark (kernel time) | skipped: CUDA graphs need a GPU | |" >>"$LOGS/summary"
  step "op memory floor (dry run: CPU, 1 shape, fp32 and AMP, per call)" floor.log 60 fp32_and_amp --device cpu \
    --shapes fpn_p6 --iters 2 --memory-floor
  step "profile (dry run: CPU, 1 shape)" profile.log 60 "$PY" -m benchmarks.benchmark_frn --device cpu --dtype float32 \
    --shapes fpn_p6 --iters 2 --profile
fi
wait
"$PY" -c "from frn_det.layers import build_info; print(f'- frn_det._C kernels: {build_info.cuda_archs()}')" 2>&1 \
  | grep -v -E 'Warning|warnings\.warn' >>"$LOGS/machine"
write_report
echo "[gpu_check] report: $REPORT" >&2
exit $failed

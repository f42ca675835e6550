#!/usr/bin/env bash
# The BCCD comparison of docs/results.md ("BCCD"), in the order of experiments/bccd/plan.md,
# resumable: run it again after an interruption and it goes on where it stopped (finished runs are
# skipped, interrupted ones resume exactly from their last checkpoint, diverged ones are not retried).
#   a. the pilot (GN and FRN at the sweep's middle rates: it sets the schedule), then the rest of
#      the learning-rate sweep (batch 2, seed 0);
#   b. once best_lr_per_image (grid.yaml) is set and `python -m experiments.gen_configs` has written
#      the cells: batch 2 seed 1 (seed 0 is the sweep's best run) and batch 1 seeds 0 and 1;
#   c. the study's arms at batch 2, seeds 0 and 1;
#   then seed 2 of every cell whose pair the decision rule leaves open with two seeds;
#   d. 8 images per batch and e. Faster R-CNN (GN / FRN / centred), seed 0, then seed 1.
# After each stage every run is collected into $OUT_DIR/bccd_*.{md,csv,png} (experiments/bccd/report.py).
# Usage: bash experiments/bccd/run.sh   (PYTHON=... another environment; JOBS=2 runs at a time;
# ROOT= where the runs go; OUT_DIR= where the report goes; DRY_RUN=1 prints the runs instead)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
JOBS=${JOBS:-2}
ROOT=${ROOT:-output/bccd_grid}
OUT_DIR=${OUT_DIR:-docs/results}
G=configs/bccd_grid/retinanet_R18_FPN
list() { "$PY" -m experiments.bccd.configs "$@"; }

grid() {  # grid NAME "SEED..." CONFIG...
  local name=$1 seeds=$2
  shift 2
  [ $# -gt 0 ] || return 0
  # shellcheck disable=SC2086  # seeds: one word each
  "$PY" -m experiments.compare_ap grid --configs "$@" --seeds $seeds --jobs "$JOBS" --threads 1 \
    --root "$ROOT" --out "$ROOT/$name" ${DRY_RUN:+--dry-run}
  [ -n "${DRY_RUN:-}" ] && return
  "$PY" -m experiments.compare_ap bccd --root "$ROOT" --out-dir "$OUT_DIR"
}

grid pilot 0 "$G"/GN_2img_lr0.02.yaml "$G"/FRN_2img_lr0.01.yaml
# shellcheck disable=SC2046  # one path per word
grid sweep 0 $(list sweep)
read -r -a BATCH2 <<<"$(list cells 2)"
read -r -a BATCH1 <<<"$(list cells 1)"
if [ ${#BATCH2[@]} -lt 4 ] || [ ${#BATCH1[@]} -lt 4 ]; then
  echo "The grid needs each arm's best rate. Once the sweep has finished, set best_lr_per_image"
  echo "(experiments/bccd/grid.yaml) from $OUT_DIR/bccd_sweep.md (the best val AP; extend an arm's"
  echo "sweep_lr_per_image where its best is an end), run python -m experiments.gen_configs and this script again."
  exit 0
fi
grid grid_seed1 1 "${BATCH2[@]}"
grid grid_batch1 "0 1" "${BATCH1[@]}"
# shellcheck disable=SC2046
grid study "0 1" $(list study)
# shellcheck disable=SC2046  # the cells whose pairs two seeds leave open (plan.md's rule)
grid seed2 2 $("$PY" -c "from experiments.bccd.report import needing_seed; print(*needing_seed('$OUT_DIR', 2))")
# d and e, as time allows: seed 0 of both before seed 1
read -r -a BATCH8 <<<"$(list cells 8)"
read -r -a TWO_STAGE <<<"$(list two-stage)"
grid extra_seed0 0 "${BATCH8[@]}" "${TWO_STAGE[@]}"
grid extra_seed1 1 "${BATCH8[@]}" "${TWO_STAGE[@]}"

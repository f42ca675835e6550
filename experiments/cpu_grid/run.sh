#!/usr/bin/env bash
# The CPU comparison of docs/results.md, in the order that gives a usable table soonest, resumable:
# run it again after an interruption and it goes on where it stopped (finished runs are skipped,
# interrupted ones resume exactly from their last checkpoint).
#   1. the learning-rate sweep (batch 2, seed 0);
#   2. once best_lr_per_image (grid.yaml) is set and `python -m experiments.gen_configs` has written the grid:
#      seed 0 of every grid cell, FRN ablation and Mask R-CNN run, the learning-rate sweep at batch 8
#      (seed 0, when generated), then seed 1 of all, then seed 2 of the grid;
#   3. the study of why FRN trails GN (study_plan.md): grid.yaml's grid_variants (arms that closed
#      the gap) at every batch with 3 seeds, seeds 0 and 1 of the first round (statistics,
#      placement), then of the second round (recipe, task), then seed 2 of the arms whose seeds straddle the
#      decision rule; each stage one queue, so that both runs
#      at a time stay busy;
#   4. after each stage, every run so far collected into docs/results/cpu_grid.{md,csv,png,...}, and
#      each part on its own for the figures of docs/results.md: cpu_grid_norms (the grid and the
#      Mask R-CNN pair), cpu_grid_ablations (FRN at batch 2 and its ablations), cpu_grid_sweep (the
#      batch-2 sweep), cpu_grid_sweep_batch8 (the batch-8 sweep with the grid's seed-0 batch-8 cells)
#      and cpu_grid_study (the study's arms with the FRN and GN runs they are paired with).
# Usage: bash experiments/cpu_grid/run.sh   (PYTHON=... another environment; JOBS=2 runs at a time; DRY_RUN=1
# prints the runs instead)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
JOBS=${JOBS:-2}
ROOT=output/cpu_grid
R=configs/cpu_grid/retinanet_R18_FPN
M=configs/cpu_grid/mask_rcnn_R18_FPN

grid() {  # grid NAME "SEED..." CONFIG...
  local name=$1 seeds=$2
  shift 2
  # shellcheck disable=SC2086  # seeds: one word each
  "$PY" -m experiments.compare_ap grid --configs "$@" --seeds $seeds --jobs "$JOBS" --threads 1 \
    --root "$ROOT" --out "$ROOT/$name" ${DRY_RUN:+--dry-run}
  [ -n "${DRY_RUN:-}" ] && return
  "$PY" -m experiments.compare_ap cpu-grid --root "$ROOT" --out-dir docs/results
}

GRID=("$R"/{BN,GN,FRN}_{1,2,8}img.yaml)
MORE=("$R"/FRN_2img_{RELU,eps-all,fpn-no-norm}.yaml "$M"/{GN,FRN}_2img.yaml)
grid sweep 0 "$R"/*_2img_lr*.yaml
for config in "${GRID[@]}" "${MORE[@]}"; do
  if [ ! -f "$config" ]; then
    echo "No $config: the grid needs each norm's best rate. Once the sweep has finished, set"
    echo "best_lr_per_image (experiments/cpu_grid/grid.yaml) from docs/results/cpu_grid.md,"
    echo "run python -m experiments.gen_configs and this script again."
    exit 0
  fi
done
grid grid_seed0 0 "${GRID[@]}"
grid ablations_seed0 0 "${MORE[@]}"
shopt -s nullglob
SWEEP8=("$R"/*_8img_lr*.yaml)
shopt -u nullglob
[ ${#SWEEP8[@]} -gt 0 ] && grid sweep_batch8 0 "${SWEEP8[@]}"
grid grid_seed1 1 "${GRID[@]}"
grid ablations_seed1 1 "${MORE[@]}"
grid grid_seed2 2 "${GRID[@]}"
# The study's arms (generated from grid.yaml's `study`): the arms that closed the gap at every batch
# of the grid (grid_variants; batch 2 is the study arm's own run), then the statistics 2x2 and
# placement hybrids (study_plan.md), then recipe and task.
STUDY=("$R"/FRN_2img_{centered,G32-centered,GN-fpn-head,G32}.yaml "$R"/GN_2img_FRN-fpn-head.yaml)
VARIANTS=($("$PY" -c 'from experiments.cpu_grid.configs import grid_variants; print(*(r for r, *_ in grid_variants()))'))
VARIANTS=("${VARIANTS[@]/#/configs/cpu_grid/}")
STUDY2=("$R"/{FRN,GN}_2img_clutter.yaml "$R"/{FRN,GN}_2img_zero-init.yaml "$R"/FRN_2img_clip-2xlr.yaml)
# `centered` met the rule with seeds 0 and 1 (2026-12-03): its grid comes before the other arms' seed 1
[ ${#VARIANTS[@]} -gt 0 ] && grid variants "0 1 2" "${VARIANTS[@]}"
grid study "0 1" "${STUDY[@]}"
grid study2 "0 1" "${STUDY2[@]}"
# Seed 2 where two seeds leave the reading open (study_plan.md): GN-fpn-head against FRN straddles the
# rule (+5.1 / +0.5, rule +3); the cluttered task's FRN - GN gap disagrees in sign (-7.6 / +9.3)
grid study_seed2 2 "$R"/FRN_2img_GN-fpn-head.yaml "$R"/{FRN,GN}_2img_clutter.yaml
# The cluttered task at twice each norm's grid rate (study_plan.md): with the grid's rates its runs
# still rose steeply up to the first decay
grid study_clutter_lr 0 "$R"/{FRN,GN}_2img_clutter-2xlr.yaml
# The centred arm through the fused op against the reference's runs of the same seeds (issue 39)
grid op_check "0 1" "$R"/FRN_2img_centered-op.yaml

#!/usr/bin/env bash
# Deterministic, Monte-Carlo and dynamic figures of trained runs, for docs/evaluation.md.
#
#   bash scripts/eval_figures.sh RUN_DIR [BATCH] [SEGMENT]     # writes RUN_DIR/eval_{mc,dyn_rms,dyn_sgd}.json
#
# BATCH: evaluation streams for all figures, dynamic evaluation included (--dynamic-streams: so
# every figure scores the same tokens; not Krause's one-stream protocol, evaluate.py's default for
# dynamic evaluation) (default 10, AWD's); SEGMENT: dynamic evaluation's
# segment length (default 5, Krause's). Environment: PARTS (default "mc rms sgd"), TUNE_TOKENS
# (validation tokens for the grid search, default 30000 as Krause's --gridfast), STAT_BATCHES
# (training segments for the rms rule's gradient statistics, default 0 = the whole split).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
run=$1; batch=${2:-10}; segment=${3:-5}
for part in ${PARTS:-mc rms sgd}; do
  if [ "$part" = mc ]; then
    $PY evaluate.py "$run/best.pt" --split test --batch-size "$batch" --mc-samples 10 --json > "$run/eval_mc.json"
  else
    $PY evaluate.py "$run/best.pt" --split test --batch-size "$batch" --dynamic-eval --dynamic-rule "$part" --dynamic-streams "$batch" \
        --dynamic-segment "$segment" --tune-on valid --tune-max-tokens "${TUNE_TOKENS:-30000}" \
        --dynamic-stat-batches "${STAT_BATCHES:-0}" --json > "$run/eval_dyn_$part.json"
  fi
done

#!/usr/bin/env bash
# Deterministic, Monte-Carlo and dynamic figures of trained runs, for docs/evaluation.md.
#
#   bash scripts/eval_figures.sh RUN_DIR [BATCH] [SEGMENT]     # writes RUN_DIR/eval_{mc,dyn_rms,dyn_sgd}.json
#
# BATCH: evaluation streams for all three figures (default 10, AWD's); SEGMENT: dynamic
# evaluation's segment length (default 5, Krause's). Tuning uses the first 30000 validation
# tokens (Krause's --gridfast); the rms rule's gradient statistics use the whole training split.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
run=$1; batch=${2:-10}; segment=${3:-5}
$PY evaluate.py "$run/best.pt" --split test --batch-size "$batch" --mc-samples 10 --json > "$run/eval_mc.json"
for rule in rms sgd; do
  $PY evaluate.py "$run/best.pt" --split test --batch-size "$batch" --dynamic-eval --dynamic-rule $rule \
      --dynamic-segment "$segment" --tune-on valid --tune-max-tokens 30000 --json > "$run/eval_dyn_$rule.json"
done

#!/usr/bin/env bash
# The paper's Bayes-by-Backprop large-batch claim at CPU scale (docs/bayes.md): bbb (one posterior
# sample per window, shared by the batch) against bbb_flipout (a pseudo-independent sample per
# example) on a reduced PTB char training set, at a small and a large batch size, several seeds;
# then the report (iterations and wall-clock to a fixed validation loss, final figures).
#
#   bash scripts/bayes.sh                      # 2 schemes x 2 batch sizes x 3 seeds (~25 min on 2 free cores)
#   SEEDS="1 2 3 4 5" bash scripts/bayes.sh    # more seeds; finished seeds are skipped
#   BAYES_DIR=/tmp/b bash scripts/bayes.sh
#
# Wen et al. 2018 Sec. 4.3 / App. E.2: batch 8192, Adam lr 0.003, KL downscaled by 10; "flipout
# converged in about 3 times fewer iterations than shared perturbations". Here: the paper's char
# model (one-hot input, orthogonal init, clip 1) at 1x128 on the first 1M training characters,
# Adam lr 0.003, kl_scale 0.1, prior N(0, 0.1^2), initial sigma 0.05, windows of 50. Nothing was
# tuned for either scheme. Two runs at a time, one thread each (2-core machine). Needs PTB.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
BAYES_DIR=${BAYES_DIR:-runs/bayes}
SEEDS=${SEEDS:-1 2 3}
JOBS=${JOBS:-2}
# batch size -> optimizer steps (about the same number of tokens for both: 256*300 ~ 32*2400/1)
STEPS_256=${STEPS_256:-300}
STEPS_32=${STEPS_32:-1200}

COMMON="--config configs/char_gauss.yaml --regularizer.sigma 0 --model.hidden_size 128
        --optim.name adam --optim.lr 0.003 --regularizer.kl_scale 0.1 --regularizer.prior_sigma 0.1
        --regularizer.init_sigma 0.05 --data.train_tokens 1000000 --train.bptt 50 --train.max_epochs 1000
        --train.patience 0 --eval.max_tokens 20000 --eval.batch_size 256 --eval.bptt 100
        --train.threads 1 --train.progress false"

jobs_list() {  # the large batch first: it is the claim
  for b in 256 32; do for reg in bbb bbb_flipout; do for s in $SEEDS; do echo "$b $reg $s"; done; done; done
}

run_one() {  # BATCH REGULARIZER SEED
  local b=$1 reg=$2 seed=$3 steps every
  if [ "$b" = 256 ]; then steps=$STEPS_256; every=10; else steps=$STEPS_32; every=40; fi
  mkdir -p "$BAYES_DIR/logs"
  # shellcheck disable=SC2086  # word splitting of $COMMON is intended
  $PY train.py $COMMON --run-dir "$BAYES_DIR/b$b/$reg" --seeds "$seed" --regularizer.name "$reg" \
      --train.batch_size "$b" --train.max_steps "$steps" --train.eval_every_steps "$every" \
      > "$BAYES_DIR/logs/b${b}_${reg}_s$seed.log" 2>&1 \
    && echo "done   b$b $reg seed $seed" || { echo "FAILED b$b $reg seed $seed: see $BAYES_DIR/logs"; return 1; }
}
export -f run_one
export PY BAYES_DIR COMMON STEPS_256 STEPS_32

start=$(date +%s)
jobs_list | xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _
echo "training took $(( ($(date +%s) - start) / 60 )) min"
$PY -m lm.analysis.bayes_report --dir "$BAYES_DIR" --out "$BAYES_DIR/report.md" --json "$BAYES_DIR/report.json"

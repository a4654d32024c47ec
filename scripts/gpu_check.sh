#!/usr/bin/env bash
# One-command GPU check (docs/gpu.md): on a machine with a CUDA GPU, in under 8 minutes,
#   1. the tests marked `cuda` (kernel vs reference loop on CUDA in fp32 and bf16, no host sync in
#      the recurrence, a few steps of every paper config, a GPU checkpoint loaded on a CPU; the
#      compiled Triton step against the reference and the torch step in fp32/bf16/fp16; captured
#      CUDA-graph trainings against eager ones);
#   2. one layer window forward+backward: cuDNN nn.LSTM, the torch step, the Triton step and the
#      Triton step in a CUDA graph, char and word sizes, fp32 and bf16 (bench/gpu_steps.py);
#   3. the throughput table on the GPU in fp32 and bf16 (bench/throughput.py --quick);
#   4. a 150-second char_flipout.yaml training (bf16 by default) with its tokens/s and valid-BPC curve;
# and writes everything into one folder with a markdown summary (summary.md).
#
#   bash scripts/gpu_check.sh --out runs/gpu_check            # on the GPU machine
#   bash scripts/gpu_check.sh --out /tmp/gc --dry-run         # the same steps on the CPU, tiny sizes (~1 min;
#                                                             # the Triton step under TRITON_INTERPRET=1)
#   PRECISION=fp32 TRAIN_SECONDS=120 bash scripts/gpu_check.sh --out DIR
#
# Needs PTB (PTB_DIR or data/ptb; docs/data.md). A failing step is recorded in the summary and
# the script goes on; its exit code is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=""
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=${2:-}; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1': use --out DIR [--dry-run]" >&2; exit 2 ;;
  esac
done
if [ -z "$OUT" ]; then
  echo "error: --out DIR is required (the folder for the results)" >&2; exit 2
fi
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "error: $OUT exists and is not empty: give a new folder (nothing there is overwritten)" >&2; exit 2
fi
mkdir -p "$OUT"
PRECISION=${PRECISION:-bf16}
TRAIN_SECONDS=${TRAIN_SECONDS:-150}
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  BENCH="--tiny --rounds 1 --threads 1 --sizes char --only none,zoneout,wd_flipout,gauss_flipout"
  STEPS="--tiny --device cpu"
  TRAIN_SECONDS=${DRY_TRAIN_SECONDS:-60}
  TRAIN="--train.max_steps 4 --train.eval_every_steps 2 --model.hidden_size 32 --train.bptt 20
         --data.train_tokens 20000 --eval.max_tokens 2000 --train.threads 1"
else
  DEVICE=cuda
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU here (torch.cuda.is_available() is False): run with --dry-run to check the script on a CPU" >&2
    exit 2
  fi
  BENCH="--quick"
  STEPS="--device cuda"
  TRAIN="--train.eval_every_steps 100 --eval.max_tokens 50000"
fi
status=0
step() { echo "[gpu_check] $*" >&2; }

step "environment -> $OUT/env.json"
$PY -m lm.analysis.gpu_report env "$OUT" "$DEVICE" || status=1

step "tests marked cuda -> $OUT/pytest_cuda.{txt,xml}"
$PY -m pytest -q -m cuda tests/test_cuda.py tests/test_lstm_triton.py tests/test_graphs.py --junitxml="$OUT/pytest_cuda.xml" -p no:cacheprovider \
  > "$OUT/pytest_cuda.txt" 2>&1 || status=1

step "one window: cuDNN, torch step, Triton step, Triton in CUDA graphs -> $OUT/steps.{md,json}"
# on a CPU (dry run) the Triton step runs under its interpreter; a GPU compiles it
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; fi
$PY bench/gpu_steps.py $STEPS --json "$OUT/steps.json" > "$OUT/steps.md" 2> "$OUT/steps.log" || status=1
unset TRITON_INTERPRET

step "throughput, fp32 and bf16 -> $OUT/throughput.{md,json}"
$PY bench/throughput.py --device "$DEVICE" --precision fp32,bf16 $BENCH --json "$OUT/throughput.json" \
  > "$OUT/throughput.md" 2> "$OUT/throughput.log" || status=1

step "char_flipout.yaml for ${TRAIN_SECONDS}s in $PRECISION -> $OUT/train"
# SIGINT after the time limit: the trainer saves last.pt and exits 130 (an interrupted run, as planned)
timeout --signal=INT "$TRAIN_SECONDS" $PY train.py --config char_flipout.yaml --run-dir "$OUT/train" \
  --train.device "$DEVICE" --train.precision "$PRECISION" --train.progress false $TRAIN > "$OUT/train.log" 2>&1
rc=$?
if [ "$rc" != 0 ] && [ "$rc" != 130 ] && [ "$rc" != 124 ]; then status=1; fi

step "summary -> $OUT/summary.md"
$PY -m lm.analysis.gpu_report summary "$OUT" || status=1
exit $status

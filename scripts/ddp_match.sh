#!/usr/bin/env bash
# Does a 2-process run (torchrun, gloo on CPU) mean what the 1-process run means? Short quickstart
# runs for regularizers whose only noise is shared by the batch; prints the validation loss of each
# (docs/distributed.md). Usage: scripts/ddp_match.sh [OUT_DIR] [STEPS]
set -euo pipefail
out=${1:-runs/ddp_match}
steps=${2:-60}
py=${PYTHON:-python}
common=(--config quickstart.yaml --train.max_steps "$steps" --train.threads 1 --train.device cpu
        --train.progress false --force)
declare -A regs=(
  [none]="--regularizer.name none"
  [gauss]="--regularizer.name gauss --regularizer.sigma 1.0"
  [weight_drop]="--regularizer.name weight_drop --regularizer.weight_p 0.5"
)
for reg in none gauss weight_drop; do
  # shellcheck disable=SC2086
  "$py" train.py "${common[@]}" --run-dir "$out/$reg-1proc" ${regs[$reg]} > "$out.$reg-1proc.log" 2>&1 || true
  # shellcheck disable=SC2086
  "$py" -m torch.distributed.run --standalone --nproc_per_node 2 train.py "${common[@]}" \
      --run-dir "$out/$reg-2proc" ${regs[$reg]} > "$out.$reg-2proc.log" 2>&1 || true
done
"$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"| regularizer | 1 process: valid loss | 2 processes: valid loss | difference |")
print("|---|---|---|---|")
for reg in ("none", "gauss", "weight_drop"):
    losses = []
    for n in (1, 2):
        rows = (out / f"{reg}-{n}proc" / "metrics.jsonl").read_text().splitlines()
        losses.append(json.loads(rows[-1])["valid_loss"])
    print(f"| {reg} | {losses[0]:.6f} | {losses[1]:.6f} | {losses[1] - losses[0]:+.1e} |")
PY

#!/usr/bin/env bash
# Paired study (docs/results.md, "Paired study"): flipout against its shared perturbation on the same
# seeds, with a pilot, a power analysis and a time budget; then regenerates its section of
# docs/results.md.
#
#   bash scripts/paired_study.sh                    # word pair: WD+Flipout against WD (budget 120 min)
#   bash scripts/paired_study.sh --pair char        # char pair: Mult. Gauss + Flipout against Mult. Gauss
#   bash scripts/paired_study.sh --dry-run          # the plan and the train.py commands, nothing run
#   bash scripts/paired_study.sh --report-only      # rewrite the section from the runs in runs/paired
#   bash scripts/paired_study.sh --help             # --pilot, --budget-min, --jobs, --max-pairs, --tiny ...
#
# Rerunning the same command continues: finished seeds are skipped, interrupted ones resumed.
# Needs PTB: PTB_DIR or data/ptb (see README, "Data").
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m lm.cli.paired_study "$@"

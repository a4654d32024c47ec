"""Front ends: ``train.py`` and ``evaluate.py`` (argument parsing, run-directory policy), their
``compare`` and ``generate`` subcommands, seed sweeps, and the paired study
(``scripts/paired_study.sh``). The top of the dependency graph: it may
import every other subpackage, and nothing imports it.
"""

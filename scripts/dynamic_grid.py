#!/usr/bin/env python
"""Grid of dynamic-evaluation settings on the first validation tokens of trained runs (docs/evaluation.md).

    python scripts/dynamic_grid.py runs/dyn/qs/best.pt --tokens 5000 --out runs/dyn/grid_qs.json

For each rule, batch size (streams) and segment length it scores the static figure and every
(η, λ) of the grid on the first ``--tokens`` validation tokens, and records the seconds each point
took. The defaults of ``evaluate.py --dynamic-eval`` were chosen from its output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lm.config import load_config  # noqa: E402
from lm.data.custom import load_data  # noqa: E402
from lm.eval.dynamic import DynamicSettings, dynamic_evaluate, gradient_stats  # noqa: E402
from lm.train.checkpoint import load_model  # noqa: E402

RMS_LRS = (5e-5, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3)
RMS_DECAYS = (0.0, 1e-3, 1e-2)
SGD_LRS = (0.1, 0.3, 1.0, 3.0, 10.0)
SGD_DECAYS = (0.0, 1e-2)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--tokens", type=int, default=5000, help="first N validation tokens (default 5000)")
    p.add_argument("--rules", default="rms,sgd")
    p.add_argument("--batch-sizes", type=ints, default=[1, 10])
    p.add_argument("--segments", type=ints, default=[5])
    p.add_argument("--rms-lrs", type=floats, default=list(RMS_LRS))
    p.add_argument("--rms-decays", type=floats, default=list(RMS_DECAYS))
    p.add_argument("--sgd-lrs", type=floats, default=list(SGD_LRS))
    p.add_argument("--sgd-decays", type=floats, default=list(SGD_DECAYS))
    p.add_argument("--stat-batches", type=int, default=200, help="rms: training segments for the statistics")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, ck = load_model(args.checkpoint, "cpu")
    cfg = load_config(base=ck["config"])
    corpus = load_data(cfg, Path(args.checkpoint).parent)
    valid = corpus.split("valid")[: args.tokens]
    rows = []
    for segment in args.segments:
        ms, stat_s = None, 0.0
        if "rms" in args.rules.split(","):
            start = time.perf_counter()
            ms = gradient_stats(model, corpus.train, segment, 100, args.stat_batches)
            stat_s = time.perf_counter() - start
        for batch in args.batch_sizes:
            start = time.perf_counter()
            static = dynamic_evaluate(model, valid, corpus.level, DynamicSettings("sgd", 0.0, 0.0, segment), batch)
            rows.append({"rule": "static", "segment": segment, "batch_size": batch, "lr": 0.0, "decay": 0.0,
                         "loss": static["loss"], "tokens": static["tokens"], "seconds": time.perf_counter() - start})
            for rule in args.rules.split(","):
                lrs, decays = (args.rms_lrs, args.rms_decays) if rule == "rms" else (args.sgd_lrs, args.sgd_decays)
                for decay in decays:
                    for lr in lrs:
                        start = time.perf_counter()
                        r = dynamic_evaluate(model, valid, corpus.level, DynamicSettings(rule, lr, decay, segment),
                                             batch, ms)
                        rows.append({"rule": rule, "segment": segment, "batch_size": batch, "lr": lr, "decay": decay,
                                     "loss": r["loss"], "tokens": r["tokens"], "seconds": time.perf_counter() - start,
                                     "gain_nats": static["loss"] - r["loss"]})
                        print(json.dumps(rows[-1]), flush=True)
        rows.append({"rule": "stats", "segment": segment, "seconds": stat_s, "stat_batches": args.stat_batches})
    Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "level": corpus.level,
                                          "valid_tokens": int(valid.numel()), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

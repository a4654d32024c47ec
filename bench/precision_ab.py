"""bf16 against fp32 training speed of one model, side by side in one process.

Alternates a few fp32 and bf16 training steps of the same language model (fused path ``none``,
window kernels ``zoneout`` and ``wd_flipout`` by default) and prints, per regularizer, the median
and range over rounds of bf16's speed over fp32's. Alternating in one process keeps the ratio
honest on a busy machine. On a CPU without bf16 units this is the figure of the start-up notice
(:data:`lm.nn.precision.BF16_WITHOUT_UNITS`); an AVX-512 machine stands in for one with::

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 FLIPOUT_LM_MARCH=x86-64-v3 \\
        python bench/precision_ab.py --threads 2 --rounds 4

``--tiny`` runs a small model in seconds (the test).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._floor import torch_threads, write_json  # noqa: E402
from lm.config import ModelConfig, RegularizerConfig  # noqa: E402
from lm.nn import hardware  # noqa: E402
from lm.nn.model import LanguageModel  # noqa: E402
from lm.nn.precision import Precision  # noqa: E402

REGULARIZERS = {
    "none": RegularizerConfig(name="none"),
    "zoneout": RegularizerConfig(name="zoneout", zoneout_c=0.5, zoneout_h=0.05),
    "wd_flipout": RegularizerConfig(name="wd_flipout", weight_p=0.5),
}


def measure(name: str, vocab: int, steps: int, batch: int, hidden: int, rounds: int) -> dict:
    """Median and range of (fp32 seconds / bf16 seconds) over ``rounds`` of two steps each."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(input="onehot", hidden_size=hidden, num_layers=1), REGULARIZERS[name], vocab)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randint(0, vocab, (steps, batch)), torch.randint(0, vocab, (steps, batch))
    policies = {p: Precision(p, "cpu") for p in ("fp32", "bf16")}

    def step(policy: Precision) -> None:
        with policy.autocast():
            logits, _ = model(x, model.init_state(batch))
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for policy in policies.values():  # warm-up: builds, probes, packed weights
        step(policy)
    ratios = []
    for _ in range(rounds):
        seconds = {}
        for key, policy in policies.items():
            t0 = time.perf_counter()
            step(policy)
            step(policy)
            seconds[key] = time.perf_counter() - t0
        ratios.append(seconds["fp32"] / seconds["bf16"])
    return {"name": name, "bf16_speed_over_fp32": statistics.median(ratios), "ratios": ratios,
            "plan": policies["bf16"].plan()[0]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="bf16 against fp32 training speed, side by side in one process")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--only", default=",".join(REGULARIZERS), help="comma-separated: " + ", ".join(REGULARIZERS))
    p.add_argument("--tiny", action="store_true", help="a small model: a smoke test in seconds")
    p.add_argument("--json", type=Path, help="also write the records here")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    if not names or any(n not in REGULARIZERS for n in names):
        p.error(f"--only: choose from {', '.join(REGULARIZERS)}")
    vocab, steps, batch, hidden = (50, 8, 4, 16) if args.tiny else (50, 100, 32, 1000)  # char size
    with torch_threads(args.threads):
        print(hardware.describe("cpu"), f"| {torch.get_num_threads()} threads | char {hidden} units, "
              f"batch {batch} x bptt {steps}")
        records = [measure(n, vocab, steps, batch, hidden, args.rounds) for n in names]
    for r in records:
        print(f"{r['name']}: bf16 speed / fp32 speed {r['bf16_speed_over_fp32']:.2f} "
              f"(range {min(r['ratios']):.2f}-{max(r['ratios']):.2f}); {r['plan']}")
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

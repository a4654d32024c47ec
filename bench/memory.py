#!/usr/bin/env python
"""Peak memory of a training with variable BPTT against the same training with a fixed BPTT.

AWD's variable BPTT (``train.variable_bptt``) draws a new window length for every window: about
thirty distinct lengths in 200 windows. Everything a window allocates must therefore be reused
across lengths or freed, else memory grows with every new length (lm/nn/pool.py says how the fused
step's buffers are bounded). This script trains ``--windows`` windows of a config on the real PTB,
once with ``train.variable_bptt=true`` and once with ``false`` (each in a fresh process, so each
peak is its own), with no validation or checkpoint in between, and reports each process's peak
resident set (``VmHWM``), its resident set after the last window and the window buffer pool's
bytes, and the ratio of the peaks. Usage::

    PTB_DIR=../shared/data/ptb python bench/memory.py --config word_awd_wd_flipout.yaml --windows 200 \\
        --json runs/memory.json
    python bench/memory.py --config quickstart.yaml --windows 20 --set model.hidden_size=64   # a quick look

``--concurrent`` runs the two processes at once (halves the wall time; each peak is still its own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm.nn import hardware  # noqa: E402  (the machine class of the figures)


def rss_bytes() -> tuple[int, int]:
    """(peak, current) resident set of this process in bytes (``/proc/self/status``; elsewhere the
    peak from getrusage and no current figure)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 0


def child(config: str, windows: int, variable: bool, overrides: Sequence[str], threads: int) -> dict:
    """Train ``windows`` windows in this process; its memory figures."""
    from lm.config import load_config
    from lm.nn import lstm_fused
    from lm.train import malloc
    from lm.train.trainer import Trainer

    cfg = load_config(config, [*overrides, f"train.variable_bptt={str(variable).lower()}",
                               f"train.threads={threads}", "train.progress=false"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        built, _ = rss_bytes()
        t, lengths, epoch = cfg.train, [], 0
        while len(lengths) < windows:
            for _, x, y in trainer.dist.windows(trainer.train_data, t.bptt, 0, t.variable_bptt, t.seed, epoch,
                                                      t.variable_bptt_max):
                trainer.train_step(x, y)
                lengths.append(x.size(0))
                peak, now = rss_bytes()
                print(f"window {len(lengths)} length {x.size(0)}: peak RSS {peak / 2**20:,.0f} MiB, now "
                      f"{now / 2**20:,.0f} MiB, pool {lstm_fused.POOL.bytes() / 2**20:,.1f} MiB",
                      file=sys.stderr, flush=True)  # progress: a long run can be followed (--log)
                if len(lengths) == windows:
                    break
            epoch += 1
        peak, now = rss_bytes()
        trainer.threads.stop()
    return {"variable_bptt": variable, "windows": windows, "distinct_lengths": len(set(lengths)),
            "longest": max(lengths), "peak_rss_bytes": peak, "rss_after_bytes": now, "rss_built_bytes": built,
            "pool_bytes": lstm_fused.POOL.bytes(), "malloc": malloc.tune()}  # the trainer's setting


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="word_awd_wd_flipout.yaml")
    p.add_argument("--windows", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="train.threads (default 0: the thread policy)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--json", default=None, help="write the two records and the ratio here")
    p.add_argument("--concurrent", action="store_true",
                   help="run the two processes at the same time (each peak is still its own process's)")
    p.add_argument("--log", default=None, help="append each process's per-window figures to <LOG>.<fixed|variable>")
    p.add_argument("--child", choices=["fixed", "variable"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.config, args.windows, args.child == "variable", args.set, args.threads)))
        return 0
    rows, procs = {}, {}
    for mode in ("fixed", "variable"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--config", args.config,
               "--windows", str(args.windows), "--threads", str(args.threads)]
        for s in args.set:
            cmd += ["--set", s]
        err = open(f"{args.log}.{mode}", "a") if args.log else subprocess.PIPE
        procs[mode] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        if not args.concurrent:
            procs[mode].wait()
    for mode, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            print(err or f"see {args.log}.{mode}", file=sys.stderr)
            return proc.returncode
        rows[mode] = json.loads(out.strip().splitlines()[-1])
        r = rows[mode]
        print(f"{mode:>8} BPTT: {r['windows']} windows ({r['distinct_lengths']} lengths, longest {r['longest']}): "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB, after {r['rss_after_bytes'] / 2**20:,.0f} MiB, "
              f"pool {r['pool_bytes'] / 2**20:,.1f} MiB", flush=True)
    ratio = rows["variable"]["peak_rss_bytes"] / rows["fixed"]["peak_rss_bytes"]
    print(f"variable / fixed peak RSS: {ratio:.3f}")
    if args.json:
        out = {"config": args.config, "overrides": args.set, "windows": args.windows, "rows": rows,
               "peak_ratio": ratio, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": {**hardware.facts("cpu"), "platform": platform.platform(), "processor": platform.processor(),
                           "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

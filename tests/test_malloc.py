"""lm/train/malloc.py: a fixed glibc mmap threshold, so that window-long blocks go back to the system."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lm.errors import UserError
from lm.train import malloc

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: free a 20 MiB tensor (glibc then raises its dynamic threshold to 20 MiB, as
# after a training window), then allocate 6 MiB and read glibc's mmapped bytes (mallinfo2.hblkhd).
PROBE = r"""
import ctypes, json, sys, torch
sys.path.insert(0, sys.argv[1])
from lm.train import malloc
text = malloc.tune()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
big = torch.empty(20 << 20, dtype=torch.uint8)
del big
before = libc.mallinfo2().hblkhd
block = torch.empty(6 << 20, dtype=torch.uint8)
during = libc.mallinfo2().hblkhd
del block
print(json.dumps({"text": text, "mmapped": during - before, "after": libc.mallinfo2().hblkhd - before}))
"""


def _probe(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != malloc.ENV}
    if env_value is not None:
        env[malloc.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_blocks_above_the_threshold_are_mmapped_and_returned():
    tuned = _probe(None)  # the default, 4 MiB
    assert "4 MiB" in tuned["text"]
    assert tuned["mmapped"] >= 6 << 20 and tuned["after"] <= 0  # from mmap, and back to the system when freed
    own = _probe("0")  # glibc's own: after a 20 MiB block was freed, 6 MiB come from the heap
    assert "FLIPOUT_LM_MMAP_THRESHOLD_MB=0" in own["text"] and own["mmapped"] < 6 << 20


def test_the_threshold_is_read_and_checked():
    assert malloc.threshold_mib({}) == malloc.DEFAULT_MIB == 4
    assert malloc.threshold_mib({malloc.ENV: "0"}) == 0 and malloc.threshold_mib({malloc.ENV: " 16 "}) == 16
    for bad in ("-1", "4.5", "lots", "33"):
        with pytest.raises(UserError, match=malloc.ENV):
            malloc.threshold_mib({malloc.ENV: bad})

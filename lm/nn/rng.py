"""Random streams of the training noise: keyed generators for the draws shared by the batch.

Two kinds of noise, two kinds of stream (docs/workflow.md, "Multi-GPU and multi-node"):

* **shared by the batch**: the weight perturbation ``ΔŴ`` of ``gauss``, ``weight_drop`` and the
  base perturbation of the flipout variants (paper Sec. 2.1), and embedding dropout's rows.
  Inside :func:`shared_noise` (the trainer opens it around every training forward) the ``k``-th
  such draw of a step comes from a generator seeded with a hash of ``(seed, step, k)``; the
  model makes its shared draws in a fixed order (embedding, then layer 1's ``W_hh`` [, ``W_ih``],
  layer 2's, ...), so ``k`` names the layer and weight. The draw therefore depends on nothing
  but the seed, the step and the layer: it is the same in every process of a data-parallel run
  and in a single-process run, and it needs no state in a checkpoint. The generator lives on the
  weight's device (a CUDA generator for CUDA weights), so the draws agree between processes on
  the same kind of device; CPU and CUDA generators give different numbers. On a CPU, float32
  draws use the 63-bit key as the Philox key (:mod:`lm.nn.fastrand`); torch's draws (CUDA, other
  dtypes, Philox off) come from the generator seeded with the key, which on a CPU (mt19937, whose
  seed has 32 bits) is the key folded to 32 bits so that every bit counts: there two keys give the
  same stream with probability 2^-32 per pair.
* **per example** (flipout signs, dropout, variational, zoneout and cell masks): torch's default
  generator of the device, which every process seeds for itself (lm.train.distributed).

Outside :func:`shared_noise` (evaluation, the gradient-variance analysis, tests that call a
regularizer directly) :func:`shared_generator` returns None, and shared draws come from the
default stream, as every draw did before keyed streams existed.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterator

import torch

from lm.nn import fastrand


def key_seed(*parts: object) -> int:
    """A 63-bit seed from a hash of ``parts`` (e.g. ``("shared", seed, step, k)``); the same on every machine."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keyed_generator(*parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded with :func:`key_seed` of ``parts`` (every bit of the
    key counts: :func:`lm.nn.fastrand.seed_keyed`)."""
    return fastrand.seed_keyed(torch.Generator(device=device), key_seed(*parts))


@dataclass
class _Step:
    seed: int
    step: int
    draws: int = 0  # shared draws made so far in this step: the key k of the next one


_current: _Step | None = None
_generators: dict[str, torch.Generator] = {}  # one reusable generator per device (reseeded per draw)


@contextlib.contextmanager
def shared_noise(seed: int, step: int) -> Iterator[None]:
    """Key the shared draws made inside on ``(seed, step, k)``, ``k`` counting the draws from 0."""
    global _current
    outer, _current = _current, _Step(seed, step)
    try:
        yield
    finally:
        _current = outer


def shared_generator(device: torch.device | str) -> torch.Generator | None:
    """The generator for the next shared draw on ``device``, or None (the default stream) outside
    :func:`shared_noise`. Use it for one draw at once: the next call reseeds it."""
    if _current is None:
        return None
    k = _current.draws
    _current.draws += 1
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    g = _generators.get(str(device))
    if g is None:
        g = _generators[str(device)] = torch.Generator(device=device)
    return fastrand.seed_keyed(g, key_seed("shared", _current.seed, _current.step, k))


def rand_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) like ``x``, seeded from ``generator`` (the default stream when None); on a CPU
    in float32 by Philox (:mod:`lm.nn.fastrand`), elsewhere ``torch.rand``."""
    return fastrand.uniform(x.shape, x, generator)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal like ``x``, seeded from ``generator`` (the default stream when None)."""
    return fastrand.normal(x.shape, x, generator)

"""Random streams of the training noise: keyed generators for the draws shared by the batch and
for the flipout signs.

Three kinds of noise, three kinds of stream (docs/distributed.md):

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
* **flipout signs** (per example, the flipout regularizers' own noise): inside
  :func:`shared_noise` the ``j``-th sign draw of a step comes from a generator keyed on
  ``("signs", seed, rank, step, j)``: per process (the rank is in the key), with no state in a
  checkpoint, and apart from the default stream. That is what pairs a flipout arm with its
  shared counterpart (``wd_flipout`` with ``weight_drop``, ``gauss_flipout`` with ``gauss``) by
  seed: the signs are the only draws one arm makes and the other does not, and here they shift
  no other stream, so the initial weights, the batches, the embedding masks and every dropout
  mask of a seed are the same in both arms (tests/test_paired_streams.py, docs/results.md
  "Paired study").
* **other per-example noise** (dropout, variational, zoneout and cell masks): torch's default
  generator of the device, which every process seeds for itself (lm.train.distributed).

Outside :func:`shared_noise` (evaluation, the gradient-variance analysis, tests that call a
regularizer directly) :func:`shared_generator` and :func:`sign_generator` return None, and those
draws come from the default stream, as every draw did before keyed streams existed.
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
    rank: int = 0
    draws: int = 0  # shared draws made so far in this step: the key k of the next one
    signs: int = 0  # sign draws made so far in this step: the key j of the next one


_current: _Step | None = None
_generators: dict[tuple[str, str], torch.Generator] = {}  # one reusable generator per (stream, device)


@contextlib.contextmanager
def shared_noise(seed: int, step: int, rank: int = 0) -> Iterator[None]:
    """Key the shared draws made inside on ``(seed, step, k)`` and the flipout sign draws on
    ``(seed, rank, step, j)``, ``k`` and ``j`` counting each kind of draw from 0. ``rank``: this
    process's rank in a data-parallel run (0 in one process)."""
    global _current
    outer, _current = _current, _Step(seed, step, rank)
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
    return _reseeded("shared", device, ("shared", _current.seed, _current.step, k))


def sign_generator(device: torch.device | str) -> torch.Generator | None:
    """The generator for the next flipout sign draw (one sign tensor, ``S`` or ``R``) on ``device``,
    or None (the default stream) outside :func:`shared_noise`. The next call reseeds it."""
    if _current is None:
        return None
    j = _current.signs
    _current.signs += 1
    return _reseeded("signs", device, ("signs", _current.seed, _current.rank, _current.step, j))


def _reseeded(stream: str, device: torch.device | str, key: tuple) -> torch.Generator:
    """The reusable generator of ``stream`` on ``device`` (one per stream, so that a draw of one
    stream cannot reseed another's mid-draw), seeded with :func:`key_seed` of ``key``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    g = _generators.get((stream, str(device)))
    if g is None:
        g = _generators[(stream, str(device))] = torch.Generator(device=device)
    return fastrand.seed_keyed(g, key_seed(*key))


def rand_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) like ``x``, seeded from ``generator`` (the default stream when None); on a CPU
    in float32 by Philox (:mod:`lm.nn.fastrand`), elsewhere ``torch.rand``."""
    return fastrand.uniform(x.shape, x, generator)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal like ``x``, seeded from ``generator`` (the default stream when None)."""
    return fastrand.normal(x.shape, x, generator)

"""Data-parallel training under ``torchrun`` (DistributedDataParallel), one process per device.

The trainer talks to a context object. :class:`Single` (one process) implements every hook
as the identity; :class:`DDPContext` (``WORLD_SIZE > 1``) implements them with ``torch.distributed``:

* data: ``train.batch_size`` is the *global* batch. The ``(N, B)`` training streams are cut
  by column: rank ``r`` of ``W`` trains on streams ``r*B/W ... (r+1)*B/W - 1`` with its own
  hidden state, and DDP averages the gradients;
* noise shared by the batch (``ΔŴ`` of the weight-noise regularizers, embedding dropout) comes
  from generators keyed on ``(seed, step, layer)`` (:mod:`lm.nn.rng`): the same in every rank and
  in one process. Variable BPTT lengths come from a generator keyed on ``(seed, epoch)``. So a
  run whose only noise is shared equals the single-process run up to float summation order;
* flipout signs come from generators keyed on ``(seed, rank, step, layer)`` (:mod:`lm.nn.rng`);
* other noise per example (dropout, variational, zoneout and cell masks) comes from
  each rank's default stream: rank 0 keeps the seed's stream, rank ``r > 0`` reseeds from
  ``(seed, r, step)`` after building the model; ``last.pt`` holds every rank's stream, so a
  resume on the same number of processes continues each exactly;
* generator: the shared noise is the same in every rank only if every rank draws it with the
  same generator (Philox where its C library loaded, else torch's): one all-gather at start-up
  checks that they agree (:func:`agree_on_noise`) and stops every rank with a one-line error
  naming each rank's generator if not;
* decisions: every rank must take the same number of steps. Rank 0 broadcasts the epoch's
  window lengths once per epoch; the training loss is averaged over ranks every step (so a
  divergence is seen by all), and that one collective also carries the stop signals: a
  Ctrl-C/SIGTERM seen by any rank stops all at the same step, at most one step later, with no
  collective of its own; rank 0 evaluates and broadcasts the result, so lr decay, the ASGD
  switch and early stopping agree;
* files: rank 0 logs and writes config, metrics and checkpoints. The checkpoint's hidden
  state is gathered from all ranks, ``(B, H)`` as in a single-process run, so a run can be
  resumed with another number of processes (then the per-rank streams of ranks > 0 are reseeded).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lm.data.batching import bptt_windows
from lm.errors import UserError
from lm.nn import fastrand
from lm.nn.rng import key_seed
from lm.train.streams import RNG, Window, epoch_lengths, set_rng_state, windows_of

State = tuple[torch.Tensor, torch.Tensor]


class Single:
    """One process: every hook is the identity."""

    rank, world, is_main = 0, 1, True

    def device(self, device: torch.device) -> torch.device:
        return device

    def shard(self, streams: torch.Tensor) -> torch.Tensor:
        """``(N, B)`` global streams -> this rank's ``(N, B / W)`` columns."""
        return streams

    def shard_state(self, state: list[State]) -> list[State]:
        """Global ``(B, H)`` hidden state -> this rank's rows."""
        return state

    def gather_state(self, state: list[State]) -> list[State]:
        """This rank's ``(B / W, H)`` hidden state -> the global ``(B, H)`` (collective)."""
        return state

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to call for training steps (DDP averages gradients across ranks)."""
        return model

    def seed_noise(self, seed: int, step: int, saved: list[RNG] | None = None,
                   device: torch.device | None = None) -> None:
        """Give each rank its own per-example noise stream (after the shared model initialisation):
        its stream from ``saved`` (``last.pt``'s ``rng_ranks``) when resuming on as many processes,
        else a fresh one for ranks > 0. One process: nothing to do (the trainer restored ``rng``)."""

    def gather_rng(self, state: RNG) -> list[RNG]:
        """Every rank's :func:`rng_state`, in rank order (collective)."""
        return [state]

    def windows(self, source: torch.Tensor, bptt: int, start: int, variable: bool, seed: int = 0,
                epoch: int = 0, longest: int | None = None) -> Iterator[Window]:
        """The training windows of epoch ``epoch`` from row ``start``; variable lengths: :func:`epoch_lengths`
        (none longer than ``longest``)."""
        if not variable:
            return bptt_windows(source, bptt, start)
        return windows_of(source, epoch_lengths(source.size(0), bptt, seed, epoch, longest), start)

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed on rank 0 and broadcast (e.g. a validation result)."""
        return fn()

    def mean(self, value: float) -> float:
        """Average of a per-rank scalar."""
        return value

    def stop_signal(self, signum: int | None) -> int | None:
        """The signal number if any rank was interrupted, so that all stop at the same step."""
        return signum

    def main_first(self, fn: Callable[[], Any], fingerprint: Callable[[Any], Sequence[str]]) -> Any:
        """Run ``fn`` on rank 0 first (it fills caches, trains a tokenizer), then on the others,
        and check that ``fingerprint`` of the result agrees."""
        return fn()

    def barrier(self) -> None:
        pass

    def agree(self, what: str, value: str, detail: str = "", fix: str = "") -> str:
        """``value`` if every rank has the same (one collective), else a :class:`UserError` naming
        each rank's value and ``detail``, and ``fix``."""
        return value


class DDPContext(Single):
    """The process group that :func:`session` initialised (see the module docstring)."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        nccl = dist.get_backend() == "nccl"
        self.comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self._signal = 0  # a signal this rank saw that no reduction has carried yet
        self._heard: int | None = None  # the largest signal the last loss reductions carried; None: no reduction

    def device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def _cols(self, total: int, what: str) -> slice:
        if total % self.world:
            raise UserError(f"{what}={total} is not divisible by the {self.world} processes: use a multiple of "
                            f"{self.world} (it is the global batch, split across processes)")
        per = total // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def shard(self, streams: torch.Tensor) -> torch.Tensor:
        return streams[:, self._cols(streams.size(1), "train.batch_size")].contiguous()

    def shard_state(self, state: list[State]) -> list[State]:
        rows = self._cols(state[0][0].size(0), "the checkpoint's batch size") if state else slice(None)
        return [(h[rows].contiguous(), c[rows].contiguous()) for h, c in state]

    def gather_state(self, state: list[State]) -> list[State]:
        out = []
        for pair in state:
            full = []
            for t in pair:
                parts = [torch.empty_like(t) for _ in range(self.world)]
                dist.all_gather(parts, t.contiguous())
                full.append(torch.cat(parts, 0))
            out.append((full[0], full[1]))
        return out

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)  # the model has no buffers to sync

    def seed_noise(self, seed: int, step: int, saved: list[RNG] | None = None,
                   device: torch.device | None = None) -> None:
        if saved is not None and len(saved) == self.world:
            set_rng_state(saved[self.rank], device or torch.device("cpu"))
            return
        if saved is not None and self.is_main:
            print(f"note: last.pt was written by {len(saved)} process(es), this run has {self.world}: the "
                  "per-example noise streams of processes > 0 start afresh (the run continues, not bit-exactly)",
                  file=sys.stderr, flush=True)
        if self.rank:
            torch.manual_seed(key_seed(seed, self.rank, step))

    def gather_rng(self, state: RNG) -> list[RNG]:
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def windows(self, source: torch.Tensor, bptt: int, start: int, variable: bool, seed: int = 0,
                epoch: int = 0, longest: int | None = None) -> Iterator[Window]:
        if not variable:
            yield from bptt_windows(source, bptt, start)
            return
        # One broadcast per epoch: rank 0's lengths (every rank would draw the same from the keyed
        # generator; the broadcast makes agreement certain, e.g. across nodes with other torch builds).
        rows = source.size(0)
        box = torch.zeros((rows - 1) // 5 + 1, dtype=torch.int64, device=self.comm)  # windows are >= 5 but the last
        if self.is_main:
            lengths = epoch_lengths(rows, bptt, seed, epoch, longest)
            box[: len(lengths)] = torch.tensor(lengths, dtype=torch.int64)
        dist.broadcast(box, 0)
        yield from windows_of(source, [n for n in box.tolist() if n], start)

    def from_main(self, fn: Callable[[], Any]) -> Any:
        box = [fn() if self.is_main else None]
        dist.broadcast_object_list(box, 0, device=self.comm)
        return box[0]

    def mean(self, value: float) -> float:
        # One all-gather of (value, pending signal) per call: the trainer's per-step loss average
        # carries the stop signals too, so stopping costs no collective of its own.
        mine = torch.tensor([value, float(self._signal)], dtype=torch.float64, device=self.comm)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        table = torch.stack(parts).cpu()  # (W, 2), the same on every rank
        self._heard = max(self._heard or 0, int(table[:, 1].max().item()))
        return float(table[:, 0].sum().item()) / self.world

    def stop_signal(self, signum: int | None) -> int | None:
        """The signal number if any rank was interrupted, so that all stop at the same step.

        A signal rides on the next :meth:`mean` (the next step's loss average) and is reported
        by the first call after it: all ranks stop at most one step after the signal. Without
        a :meth:`mean` since the last call, one all-reduce decides now."""
        self._signal = self._signal or signum or 0
        heard = self._heard
        if heard is None:
            t = torch.tensor([self._signal], device=self.comm)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            heard = int(t.item())
        self._heard = None
        if not heard:
            return None
        own, self._signal = self._signal, 0
        return own or heard

    def main_first(self, fn: Callable[[], Any], fingerprint: Callable[[Any], Sequence[str]]) -> Any:
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UserError as e:
                error = str(e)
        box = [error]
        dist.broadcast_object_list(box, 0, device=self.comm)  # a UserError on rank 0 stops every rank
        if box[0] is not None:
            raise UserError(box[0])
        if not self.is_main:
            result = fn()
        mine = hashlib.sha256("\n".join(fingerprint(result)).encode()).hexdigest()
        prints: list[Any] = [None] * self.world
        dist.all_gather_object(prints, mine)
        if len(set(prints)) > 1:
            raise UserError("the processes built different vocabularies (their data differ): give every node the "
                            "same data files and data root")
        return result

    def barrier(self) -> None:
        dist.barrier()

    def agree(self, what: str, value: str, detail: str = "", fix: str = "") -> str:
        seen: list[Any] = [None] * self.world
        dist.all_gather_object(seen, (value, detail))
        if len({v for v, _ in seen}) > 1:
            ranks = "; ".join(f"process {r}: {d or v}" for r, (v, d) in enumerate(seen))
            raise UserError(f"the processes disagree on {what} ({ranks}): {fix}")
        return value


def agree_on_noise(context: Single, device: torch.device) -> str:
    """Check that every process draws the noise with the same generator (:func:`lm.nn.fastrand.generator_name`:
    a process without the Philox library would draw other shared noise); the description of it."""
    context.agree("the generator of the noise", fastrand.generator_name(device), fastrand.describe_generator(device),
                  "give every node a working C compiler, the same FLIPOUT_LM_FUSED and FLIPOUT_LM_CACHE settings "
                  "(or set FLIPOUT_LM_FUSED=0 on every node), so that all draw the same shared noise")
    return fastrand.describe_generator(device)


def current() -> Single:
    """The context of an initialised process group with several ranks, else :class:`Single`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DDPContext()
    return Single()


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[Single]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE > 1``), yield the context, leave.

    Backend: NCCL when training on CUDA, gloo on CPU. Re-entrant: inside a session (a seed
    sweep runs one per seed) it yields the current context and leaves the group alone.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed: run without torchrun")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield DDPContext()
    finally:
        dist.destroy_process_group()

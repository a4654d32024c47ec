"""Data-parallel training under ``torchrun`` (DistributedDataParallel), one process per device.

The trainer talks to a context object. :class:`Single` (one process) implements every hook
as the identity, so single-process training runs exactly the code and random draws it ran
before; :class:`DDPContext` (``WORLD_SIZE > 1``) implements them with ``torch.distributed``:

* data: ``train.batch_size`` is the *global* batch. The ``(N, B)`` training streams are cut
  by column: rank ``r`` of ``W`` trains on streams ``r*B/W ... (r+1)*B/W - 1`` with its own
  hidden state, and DDP averages the gradients, so one step equals a single-process step on
  all ``B`` streams (up to float summation order);
* noise: rank 0 keeps the seed's random stream (the single-process one); rank ``r > 0`` reseeds
  from ``(seed, r, step)`` after building the model, so dropout/flipout noise differs by rank;
* decisions: every rank must take the same number of steps. Variable BPTT lengths are drawn
  by rank 0 and broadcast; the training loss is averaged over ranks (so divergence is seen by
  all); a Ctrl-C/SIGTERM seen by any rank stops all at the same step; rank 0 evaluates and
  broadcasts the result, so lr decay, the ASGD switch and early stopping agree;
* files: rank 0 logs and writes config, metrics and checkpoints. The checkpoint's hidden
  state is gathered from all ranks, ``(B, H)`` as in a single-process run, so a run can be
  resumed with another number of processes (not bit-exactly: noise streams differ).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lm.data.batching import bptt_windows, sample_window_length
from lm.errors import UserError

State = tuple[torch.Tensor, torch.Tensor]
Window = tuple[int, torch.Tensor, torch.Tensor]


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

    def seed_noise(self, seed: int, step: int) -> None:
        """Give ranks > 0 their own noise stream (after the shared model initialisation)."""

    def windows(self, source: torch.Tensor, bptt: int, start: int, variable: bool) -> Iterator[Window]:
        return bptt_windows(source, bptt, start, variable)

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


class DDPContext(Single):
    """The process group that :func:`session` initialised (see the module docstring)."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        nccl = dist.get_backend() == "nccl"
        self.comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

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

    def seed_noise(self, seed: int, step: int) -> None:
        if self.rank:
            digest = hashlib.sha256(f"{seed}:{self.rank}:{step}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def windows(self, source: torch.Tensor, bptt: int, start: int, variable: bool) -> Iterator[Window]:
        if not variable:
            yield from bptt_windows(source, bptt, start)
            return
        i = start
        while i < source.size(0) - 1:
            length = torch.tensor([sample_window_length(bptt) if self.is_main else 0], device=self.comm)
            dist.broadcast(length, 0)
            n = min(int(length.item()), source.size(0) - 1 - i)
            yield i, source[i: i + n], source[i + 1: i + 1 + n]
            i += n

    def from_main(self, fn: Callable[[], Any]) -> Any:
        box = [fn() if self.is_main else None]
        dist.broadcast_object_list(box, 0, device=self.comm)
        return box[0]

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.comm)
        dist.all_reduce(t)
        return t.item() / self.world

    def stop_signal(self, signum: int | None) -> int | None:
        t = torch.tensor([signum or 0], device=self.comm)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return signum or (int(t.item()) or None)

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

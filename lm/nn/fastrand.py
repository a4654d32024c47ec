"""Fast draws of the training noise on a CPU: Philox4x32-10 in C, seeded from a torch.Generator.

The noise of a window is large: a ``(4H, H)`` Gaussian or Bernoulli matrix for ``gauss``,
``weight_drop`` and the flipout variants (4M numbers at the char size), ``(T, B, H)`` masks for
zoneout, cell dropout and output dropout (3.2M). torch's CPU generator (mt19937) makes them one
at a time on one thread: about 33 ms per 4M uniforms or normals on this machine, 6-8% of a
training step. :file:`csrc/philox.c` makes them with the counter-based Philox4x32-10 (the
generator of cuRAND and of torch's CUDA backend), vectorised and split across torch's threads:
about 4 ms for either (``bench/profile_step.py`` shows the step before and after).

Seeding keeps every property of the streams the trainer relies on: a draw takes **one** 63-bit
number from the ``torch.Generator`` it is given (the default CPU generator when None, or a keyed
generator of :mod:`lm.nn.rng` for the draws shared by the batch) and uses it as the Philox key.
So a run is fixed by its seed, ``last.pt``'s generator states resume it exactly, and a shared draw
is the same in every process. A draw does not depend on the number of threads.

Distributions: :func:`uniform` gives float32 multiples of 2^-24 in [0, 1) (as ``torch.rand``);
:func:`two_valued` compares such a uniform with ``p`` (so ``P(below) = p`` up to 2^-24, as
``torch.rand(...) < p``); :func:`normal` is Box-Muller, its radius from a 32-bit uniform in
(0, 1], so ``|z| <= 6.66`` (a standard normal exceeds that with probability 3e-11).

Where: float32 tensors on a CPU with the library built (:mod:`lm.nn.cext`); elsewhere (CUDA,
other dtypes, ``FAST = False``, no compiler) the same functions draw with torch's generator.
"""

from __future__ import annotations

import ctypes
from ctypes import c_float, c_int, c_int64, c_uint64, c_void_p

import torch

from lm.nn import cext

FAST: bool | None = None
"""None (default): Philox on the CPU wherever it applies; False: always torch's generator."""


def library() -> ctypes.CDLL | None:
    lib, _ = cext.load("philox")
    if lib is None or getattr(lib, "_flipout_ready", False):
        return lib
    for name in ("philox_uniform", "philox_normal"):
        getattr(lib, name).argtypes = [c_void_p, c_int64, c_uint64, c_int]
    lib.philox_two_valued.argtypes = [c_void_p, c_int64, c_uint64, c_int, c_float, c_float, c_float]
    lib._flipout_ready = True
    return lib


def _fast(like: torch.Tensor, dtypes: tuple = (torch.float32,)) -> ctypes.CDLL | None:
    if FAST is False or like.device.type != "cpu" or like.dtype not in dtypes:
        return None
    return library()


def _seed(generator: torch.Generator | None) -> int:
    """One 63-bit number from ``generator`` (the default CPU generator when None): the Philox key."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator).item())


def _draw(kind: str, shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``kind`` 'uniform' or 'normal': Philox where it applies, else torch's own draw."""
    lib = _fast(like)
    if lib is None:
        draw = torch.rand if kind == "uniform" else torch.randn
        return draw(shape, dtype=like.dtype, device=like.device, generator=generator)
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    getattr(lib, f"philox_{kind}")(out.data_ptr(), out.numel(), _seed(generator), torch.get_num_threads())
    return out


def uniform(shape, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform [0, 1) of ``shape`` with ``like``'s dtype and device (``torch.rand``'s distribution)."""
    return _draw("uniform", shape, like, generator)


def normal(shape, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal of ``shape`` with ``like``'s dtype and device."""
    return _draw("normal", shape, like, generator)


def two_valued(shape, like: torch.Tensor, p: float, below: float, above: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``below`` with probability ``p`` and ``above`` otherwise, independently per element (a
    Bernoulli mask with its values, e.g. ``p = 1 - keep``, 0 and ``1 / keep`` for scaled dropout).
    A bf16/fp16 ``like`` (activations under autocast) gets the float32 draw cast to its dtype."""
    low = like.dtype in (torch.bfloat16, torch.float16)
    lib = _fast(like, (torch.float32, torch.bfloat16, torch.float16))
    if lib is None:
        u = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
        return torch.where(u < p, torch.tensor(below, dtype=like.dtype, device=like.device),
                           torch.tensor(above, dtype=like.dtype, device=like.device))
    out = torch.empty(shape, dtype=torch.float32, device=like.device)
    lib.philox_two_valued(out.data_ptr(), out.numel(), _seed(generator), torch.get_num_threads(), p, below, above)
    return out.to(like.dtype) if low else out

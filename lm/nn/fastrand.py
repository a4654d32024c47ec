"""Fast draws of the training noise on a CPU: Philox4x32-10 in C, seeded from a torch.Generator.

The noise of a window is large: a ``(4H, H)`` Gaussian or Bernoulli matrix for ``gauss``,
``weight_drop`` and the flipout variants (4M numbers at the char size), ``(T, B, H)`` masks for
zoneout, cell dropout and output dropout (3.2M). torch's CPU generator (mt19937) makes them one
at a time on one thread: about 33 ms per 4M uniforms or normals on this machine, 6-8% of a
training step. :file:`csrc/philox.c` makes them with the counter-based Philox4x32-10 (the
generator of cuRAND and of torch's CUDA backend), vectorised and split across torch's threads:
about 4 ms for either (``bench/profile_step.py`` shows the step before and after).

Seeding keeps every property of the streams the trainer relies on: a draw takes **one** 63-bit
number from the ``torch.Generator`` it is given (the default CPU generator when None) and uses it
as the Philox key; a generator seeded by :func:`seed_keyed` (the keyed generators of
:mod:`lm.nn.rng` for the draws shared by the batch) gives its whole 63-bit key instead, since
torch's CPU generator (mt19937) would take only 32 bits of it. So a run is fixed by its seed,
``last.pt``'s generator states resume it exactly, and a shared draw is the same in every process.
A draw does not depend on the number of threads.

Every process of a run must draw with the same generator (Philox or torch's), else the shared
noise differs between them: :func:`generator_name` says which one this process uses, and the
trainer checks at start-up that all processes agree (:mod:`lm.train.distributed`).

Distributions: :func:`uniform` gives float32 multiples of 2^-24 in [0, 1) (as ``torch.rand``);
:func:`two_valued` compares such a uniform with ``p`` (so ``P(below) = p`` up to 2^-24, as
``torch.rand(...) < p``), and :func:`bernoulli_bytes` stores that comparison as 0/1 bytes;
:func:`normal` is Box-Muller, its radius from a 32-bit uniform in (0, 1], so ``|z| <= 6.66`` (a
standard normal exceeds that with probability 3e-11).

Where: float32 tensors on a CPU with the library built (:mod:`lm.nn.cext`); elsewhere (CUDA,
other dtypes, ``FAST = False``, no compiler) the same functions draw with torch's generator.
"""

from __future__ import annotations

import ctypes
import weakref
from ctypes import c_float, c_int, c_int64, c_uint64, c_void_p

import torch

from lm.nn import cext

FAST: bool | None = None
"""None (default): Philox on the CPU wherever it applies; False: always torch's generator."""

_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # generator -> its 63-bit key, until drawn
MASK64 = (1 << 64) - 1


def fold32(key: int) -> int:
    """A 64-to-32-bit mix of ``key`` (splitmix64's finaliser, high half): every bit of the key
    changes the result, where torch's CPU generator would keep only the low 32 bits."""
    z = (key + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) >> 32


def seed_keyed(generator: torch.Generator, key: int) -> torch.Generator:
    """Seed ``generator`` from the 63-bit ``key``: a CPU generator with :func:`fold32` of it (mt19937
    takes 32 bits), a CUDA one (Philox) with the key itself; the next Philox draw of this module
    from ``generator`` uses the whole key as its Philox key. Returns ``generator``."""
    generator.manual_seed(fold32(key) if generator.device.type == "cpu" else key)
    _KEYS[generator] = key
    return generator


def library() -> ctypes.CDLL | None:
    lib, _ = cext.load("philox")
    if lib is None or getattr(lib, "_flipout_ready", False):
        return lib
    for name in ("philox_uniform", "philox_normal"):
        getattr(lib, name).argtypes = [c_void_p, c_int64, c_uint64, c_int]
    lib.philox_two_valued.argtypes = [c_void_p, c_int64, c_uint64, c_int, c_float, c_float, c_float]
    lib.philox_bytes.argtypes = [c_void_p, c_int64, c_uint64, c_int, c_float]
    lib._flipout_ready = True
    return lib


def generator_name(device: torch.device | str) -> str:
    """'philox' where float32 draws on ``device`` use this module's Philox library, else 'torch'."""
    if torch.device(device).type != "cpu" or FAST is False or library() is None:
        return "torch"
    return "philox"


def describe_generator(device: torch.device | str) -> str:
    """The generator of the noise on ``device`` and, for torch's on a CPU, why Philox is not used."""
    if generator_name(device) == "philox":
        return "philox (Philox4x32-10 in C, lm/nn/fastrand.py)"
    if torch.device(device).type != "cpu":
        return f"torch ({torch.device(device).type} generator)"
    why = "fastrand.FAST = False" if FAST is False else cext.status("philox").describe()
    return f"torch (mt19937; Philox {why})"


def _fast(like: torch.Tensor, dtypes: tuple = (torch.float32,)) -> ctypes.CDLL | None:
    if FAST is False or like.device.type != "cpu" or like.dtype not in dtypes:
        return None
    return library()


def _seed(generator: torch.Generator | None) -> int:
    """The Philox key: a keyed generator's key (:func:`seed_keyed`, once), else one 63-bit number
    from ``generator`` (the default CPU generator when None)."""
    if generator is not None:
        key = _KEYS.pop(generator, None)
        if key is not None:
            return key
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
    A bf16/fp16 ``like`` (activations under autocast) gets the float32 draw cast to its dtype; so
    does torch's draw, which in bfloat16 would resolve ``p`` only to 2^-8."""
    low = like.dtype in (torch.bfloat16, torch.float16)
    lib = _fast(like, (torch.float32, torch.bfloat16, torch.float16))
    if lib is None:
        wide = torch.float64 if like.dtype == torch.float64 else torch.float32
        u = torch.rand(shape, dtype=wide, device=like.device, generator=generator)
        return torch.where(u < p, torch.tensor(below, dtype=like.dtype, device=like.device),
                           torch.tensor(above, dtype=like.dtype, device=like.device))
    out = torch.empty(shape, dtype=torch.float32, device=like.device)
    lib.philox_two_valued(out.data_ptr(), out.numel(), _seed(generator), torch.get_num_threads(), p, below, above)
    return out.to(like.dtype) if low else out


def bernoulli_bytes(shape, like: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``torch.uint8`` mask of ``shape`` on ``like``'s device: 1 with probability ``p``, else 0.
    The same draw as ``two_valued(shape, like, p, 1.0, 0.0, generator)`` (the same uniforms, the
    same comparison) in a quarter of the memory; the window kernel's step masks (cell dropout,
    zoneout) are kept so and scaled where they are read. ``like``'s dtype chooses the generator as
    for :func:`two_valued`."""
    lib = _fast(like, (torch.float32, torch.bfloat16, torch.float16))
    if lib is None:
        wide = torch.float64 if like.dtype == torch.float64 else torch.float32
        u = torch.rand(shape, dtype=wide, device=like.device, generator=generator)
        return (u < p).to(torch.uint8)
    out = torch.empty(shape, dtype=torch.uint8, device=like.device)
    lib.philox_bytes(out.data_ptr(), out.numel(), _seed(generator), torch.get_num_threads(), p)
    return out

"""Interleaved timing, and the *matmul floor* of the window kernel (:mod:`lm.nn.lstm_kernel`).

One implementation for ``bench/flipout_gemm.py --window`` (one layer, each backend) and
``bench/throughput.py`` (:func:`model_floors`: the paper's models, the backend the kernel picks).

The matmul floor answers: what ratio to ``nn.LSTM`` would a window kernel reach if it did nothing
but its matmuls? :func:`window_matmuls` issues one layer's matmuls of one training window as the
layer issues them, on random operands:

* the input projection ``x W_ihᵀ`` ``(T·B, in) -> (T·B, 4H)`` as the window kernel computes it
  (:func:`lm.nn.lstm_fused.project`: its bias is added by the recurrence's element-wise step) and
  its gradients ``dW_ih`` and (when the layer's input needs a gradient: not for one-hot
  characters) ``dx``;
* T forward products of :class:`~lm.nn.lstm_matmul.GateMatmul` and T backward products of
  :class:`~lm.nn.lstm_matmul.HiddenGrad` ``(B, H) x (H, 4H)``, their per-window setup included
  (the oneDNN weight reorders of the ``packed`` backend, the ``[W_hh, ΔŴ]`` stack of ``bmm``),
  with the ``ΔŴ`` products of flipout;
* the window-wide ``dW_hh`` ``(4H, T·B) x (T·B, H)``, and ``dΔŴ`` with flipout.

No element-wise work of the recurrence, no mask draws, no Python bookkeeping. Where the fused C
step runs (:mod:`lm.nn.lstm_fused`, the CPU default), the products are issued as it issues them:
on operands already in the matmuls' dtype (the C step writes them so) and with no element-wise
op around them. Elsewhere (the torch step) the products' own ``add``/``addcmul`` into the gate
buffer and their operands' casts stay, since that step issues them.
:func:`lstm_reference` is ``nn.LSTM``'s forward + backward of the same layers (oneDNN on CPU,
cuDNN on CUDA), which does all of a layer's work, element-wise included. The *layer floor* is
``nn.LSTM time / matmul time``. A training step does more than its layers: the loss, the
embedding lookup, the decoder, clipping and the optimizer, the same in both models. So
:func:`model_floors` also times the reference ``nn.LSTM`` model's whole training step ``S``: its
rest ``E = S - L`` is added to both sides, and the *model floor* ``(L + E) / (M + E)`` =
``S / (S - L + M)`` is the ratio of a model whose layers did nothing but their matmuls. Leaving
``E`` out overstates the floor above 1 and understates it below 1 (flipout), where measured
ratios then beat it. The decoder's three matmuls ``D`` (forward, ``dh``, ``dW``; inside ``E``)
are timed too, for the former definition ``(L + D) / (M + D)``: every matmul of a step and
nothing else (an embedding is a lookup, a one-hot input is part of the first layer's projection).

Precision (``dtype`` bf16 or fp16): the matmuls run as the kernel runs them under autocast: the
decoder under ``torch.autocast`` (as autograd runs ``F.linear``), the input projection, the
per-step products and the weight gradients with ``dtype`` and autocast off (explicit casts, as the
kernel casts); ``nn.LSTM``'s forward runs under autocast.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lm.nn import hardware, lstm_fused, lstm_matmul

Fn = Callable[[], object]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU threads set to ``n`` (0: left as they are) inside, restored after: the scripts'
    ``main`` may be called in-process (tests)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_json(path, obj) -> None:
    """``obj`` as indented JSON at ``path`` (its folder created): the scripts' ``--json``. Each
    record of a list says which machine class measured it (``machine``: CPU model, ISA, bf16
    units, threads); a script that writes one dict adds it itself."""
    path = Path(path)
    records = [r for r in obj if isinstance(r, dict)] if isinstance(obj, list) else []
    facts = hardware.facts("cpu") if records else None  # read once, not per record
    for rec in records:
        rec.setdefault("machine", facts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Fn, device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``fn`` takes (queued GPU work is waited for on both sides)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@dataclass
class Rounds:
    """Per-round seconds of :func:`interleave`: ``own[name][r]`` the run's time in round ``r``,
    ``ref[name][r]`` the mean of the two reference timings around it, ``ref_all`` every
    reference timing."""

    own: dict[str, list[float]]
    ref: dict[str, list[float]]
    ref_all: list[float]

    def ratios(self, name: str) -> list[float]:
        """Reference time over the run's time, per round (above 1: the run is faster)."""
        return [r / t for r, t in zip(self.ref[name], self.own[name])]


def interleave(reference: Fn, runs: Mapping[str, Fn], rounds: int, device: torch.device | str = "cpu") -> Rounds:
    """Time ``runs`` between timings of ``reference``: R, A, R, B, ..., R per round, the order of
    the runs rotating from round to round, so that slow drifts of a shared machine hit every run
    and its reference alike."""
    names = list(runs)
    out = Rounds({n: [] for n in names}, {n: [] for n in names}, [])
    for r in range(rounds):
        k = r % max(1, len(names))
        before = timed(reference, device)
        out.ref_all.append(before)
        for name in names[k:] + names[:k]:
            t = timed(runs[name], device)
            after = timed(reference, device)
            out.own[name].append(t)
            out.ref[name].append((before + after) / 2)
            out.ref_all.append(after)
            before = after
    return out


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _low(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def window_matmuls(hid: int, inp: int, batch: int, steps: int, flip: bool, *, packed: bool | None = None,
                   dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                   input_grad: bool = True) -> Fn:
    """One layer's matmuls of one training window (see the module doc), as a function to time.

    ``packed``: force the ``packed`` (True) or ``bmm`` (False) backend of :mod:`lm.nn.lstm_matmul`;
    None keeps the kernel's own choice. ``dtype``: the low precision of the matmuls, or None."""
    dev = torch.device(device)
    if dev.type == "cpu" and dtype is not None and not hardware.onednn_linear(dtype):
        dtype = None  # the window kernel's float32 fallback (lm.nn.precision.window_dtype)
    new = lambda *shape: torch.randn(*shape, device=dev)  # noqa: E731
    w = new(4 * hid, hid) / hid ** 0.5
    delta = torch.randn_like(w) if flip else None
    w_ih, x = new(4 * hid, inp), new(steps, batch, inp)
    xt, r, dgt = new(batch, 4 * hid), torch.ones(batch, 4 * hid, device=dev), new(batch, 4 * hid)
    left = new(2, batch, hid) if flip else new(batch, hid)  # [h̃, h̃ ∘ s] with flipout, else h̃
    s, base, out = torch.ones(batch, hid, device=dev), torch.zeros(batch, hid, device=dev), new(batch, hid)
    d_gates, h_all = new(steps * batch, 4 * hid), new(steps * batch, hid)
    w_ih_low, x_low = _low(w_ih, dtype), _low(x, dtype).view(steps * batch, inp)  # what the kernel saves
    # the fused C step writes the products' operands in their dtype: no casts of them to time
    ops_low = [_low(t, dtype) for t in (left, dgt, d_gates, h_all)]

    def run() -> None:
        before = lstm_matmul.PACKED
        if packed is not None:
            lstm_matmul.PACKED = None if packed else False
        try:
            with torch.autocast(dev.type, enabled=False):  # the kernel casts explicitly
                fused = lstm_fused.usable(w, dtype)  # the fused C step, with its pooled buffers
                xproj = lstm_fused.project(x, w_ih, dtype, fused)[0]
                if fused:
                    lstm_fused.release(xproj)
                    _fused_products(w, delta, batch, steps, dtype, ops_low[0], ops_low[1])
                    grad, h_grad = ops_low[2], ops_low[3]
                else:  # the torch step: its products with the adds they issue into the gate buffers
                    gates = lstm_matmul.GateMatmul(w, delta, batch, dtype)
                    for _ in range(steps):
                        gates(xt, left, r)
                    grad_h = lstm_matmul.HiddenGrad(w, delta, None, batch, gates.stacked, dtype)
                    for _ in range(steps):
                        grad_h(base, dgt, r, s, out)
                    grad, h_grad = d_gates, h_all  # cast by low_mm, as the torch step's are
                for _ in range(2 if flip else 1):  # dW_hh, and dΔŴ
                    lstm_matmul.low_mm(grad.t(), h_grad, dtype)
                grad = _low(grad, dtype)  # the gate gradients as the kernel hands them to the projection
                if input_grad:
                    lstm_matmul.low_mm(grad, w_ih_low, dtype)  # dx
                lstm_matmul.low_mm(grad.t(), x_low, dtype)  # dW_ih
        finally:
            lstm_matmul.PACKED = before
    return run


def _fused_products(w, delta, batch: int, steps: int, dtype, left, dgt) -> None:
    """The per-step products of :mod:`lm.nn.lstm_fused` alone: per window the weights cast and
    reordered (forward) or transposed and reordered (backward), per step ``h̃ W_hhᵀ`` (and
    ``(h̃ ∘ s) ΔŴᵀ``) forward and ``dgates W_hh`` (and ``(dgates ∘ r) ΔŴ``) backward, on operands
    already in the matmuls' dtype (``left``, ``dgt``); the C step does the element-wise work."""
    forward = lstm_fused.products(w, delta, dtype, batch)
    for _ in range(steps):
        for k, lin in enumerate(forward):
            lin(left[k] if delta is not None else left)
    backward = lstm_fused.products(w, delta, dtype, batch, backward=True)
    for _ in range(steps):
        for lin in backward:
            lin(dgt)


def window_stack(inp: int, hid: int, layers: int, batch: int, steps: int, flip: bool, *, onehot: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Fn:
    """:func:`window_matmuls` of ``layers`` stacked layers (the first on ``inp`` inputs, which
    need no gradient when ``onehot``), one after the other, as a language model runs them."""
    fns = [window_matmuls(hid, inp if i == 0 else hid, batch, steps, flip, dtype=dtype, device=device,
                          input_grad=not (i == 0 and onehot)) for i in range(layers)]
    return lambda: [f() for f in fns]


def lstm_reference(inp: int, hid: int, layers: int, batch: int, steps: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu", input_grad: bool = False) -> Fn:
    """``nn.LSTM(inp, hid, layers)``'s forward (under autocast with ``dtype``) + backward of one
    window, gradients set to None first as a training step's ``zero_grad`` does."""
    dev = torch.device(device)
    lstm = nn.LSTM(inp, hid, layers).to(dev)
    x = torch.randn(steps, batch, inp, device=dev, requires_grad=input_grad)

    # where oneDNN has no LSTM in this dtype, nn.LSTM runs in float32 (as the fused layers and
    # the benchmark's nn.LSTM model do)
    dtype = None if dev.type == "cpu" and dtype is not None and not hardware.fused_lstm(dtype) else dtype

    def run() -> None:
        lstm.zero_grad(set_to_none=True)
        x.grad = None
        with _autocast(dev, dtype):
            out, _ = lstm(x)
        out.float().sum().backward()
    return run


def decoder_matmuls(hid: int, vocab: int, batch: int, steps: int, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> Fn:
    """The decoder's matmuls of one window: logits ``(T·B, H) -> (T·B, V)``, ``dh`` and ``dW``
    (under autocast: the logits' float32 gradient cast once, the products in ``dtype``)."""
    dev = torch.device(device)
    w, b, h, d = (torch.randn(*s, device=dev) for s in ((vocab, hid), (vocab,), (steps * batch, hid),
                                                       (steps * batch, vocab)))
    w_saved, h_saved = _low(w, dtype), _low(h, dtype)

    def run() -> None:
        with _autocast(dev, dtype):
            F.linear(h, w, b)
        grad = _low(d, dtype)
        grad.mm(w_saved)
        grad.t().mm(h_saved)
    return run


def step_floor(l: float, m: float, rest: float) -> float:
    """One round's model floor ``(L + E) / (M + E)``: ``l`` the layers' ``nn.LSTM`` time, ``m``
    their matmuls' time, ``rest`` the rest of the step ``E`` (0 gives the layer floor ``L / M``;
    the larger the rest, the nearer the floor is to 1, from either side)."""
    return (l + rest) / (m + rest)


def step_rest(step: float, layers: float) -> float:
    """The rest of a training step, ``E = S - L``, clamped at 0: ``S`` and ``L`` are timed apart
    (``L`` as the mean of its two neighbouring timings), and where the layers are nearly the
    whole step noise can make ``S < L``; a negative rest would push the floor past ``L / M``."""
    return max(step - layers, 0.0)


def model_floors(inp: int, hid: int, layers: int, vocab: int, batch: int, steps: int, *, onehot: bool,
                 kinds: tuple[str, ...] = ("plain", "flipout"), rounds: int = 3,
                 dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                 step: Fn | None = None) -> dict[str, dict]:
    """The floors of a language model: ``layers`` LSTM layers of ``hid`` units on ``inp`` inputs,
    a ``hid -> vocab`` decoder, windows of ``steps x batch``; ``onehot``: the first layer's input
    needs no gradient; ``step``: the reference ``nn.LSTM`` model's whole training step, if given.
    For each kind ('plain': the window kernel without flipout; 'flipout')::

        {"matmul_floor": median over rounds of (L + E) / (M + E) (:func:`step_floor`),
         "matmuls_only_floor": median over rounds of (L + D) / (M + D),
         "layer_floor":  median over rounds of L / M,
         "floor_rounds": the per-round values of matmul_floor,
         "floor_ms": medians of L, M, D and (with ``step``) S and E}

    with ``L`` ``nn.LSTM``'s forward + backward of the layers, ``M`` the window kernel's
    matmuls of the layers, ``D`` the decoder's matmuls, ``S`` the ``step`` and ``E`` its rest,
    ``S`` minus the mean of the two ``L`` timings around it in its round, clamped at 0
    (:func:`step_rest`). All are timed in interleaved rounds, one warm-up call each first. Without
    ``step`` there is no ``E``, and ``matmul_floor`` falls back to ``matmuls_only_floor``."""
    reference = lstm_reference(inp, hid, layers, batch, steps, dtype=dtype, device=device, input_grad=not onehot)
    runs = {kind: window_stack(inp, hid, layers, batch, steps, kind == "flipout", onehot=onehot, dtype=dtype,
                               device=device) for kind in kinds}
    runs["decoder"] = decoder_matmuls(hid, vocab, batch, steps, dtype=dtype, device=device)
    if step is not None:
        runs["step"] = step
    for fn in (reference, *runs.values()):
        fn()
    t = interleave(reference, runs, rounds, device)
    dec = t.own["decoder"]
    rest = [step_rest(s, ls) for s, ls in zip(t.own["step"], t.ref["step"])] if step is not None else None
    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    out = {}
    for kind in kinds:
        matmuls_only = [(r + d) / (m + d) for r, m, d in zip(t.ref[kind], t.own[kind], dec)]
        model = matmuls_only if rest is None else [step_floor(r, m, e) for r, m, e in
                                                   zip(t.ref[kind], t.own[kind], rest)]
        times = {"nn_lstm_layers": ms(t.ref[kind]), "window_matmuls": ms(t.own[kind]), "decoder_matmuls": ms(dec)}
        if rest is not None:
            times.update(nn_lstm_step=ms(t.own["step"]), rest=ms(rest))
        out[kind] = {"matmul_floor": statistics.median(model), "matmuls_only_floor": statistics.median(matmuls_only),
                     "layer_floor": statistics.median(t.ratios(kind)), "floor_rounds": model, "floor_ms": times}
    return out

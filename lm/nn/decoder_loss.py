"""The decoder and its cross-entropy in one autograd node that keeps a single ``(N, V)`` buffer.

``F.cross_entropy(decoder(h))`` keeps the logits, saves their log-softmax for the backward and,
in the backward, builds the log-softmax's gradient and the logits' gradient: four ``(N, V)``
tensors alive at once for ``N = T * B`` tokens. On AWD's word model (``T`` = 70, ``B`` = 80, 10k
words) each is 224 MB, so the loss outweighed the three LSTM layers, and because it grows with the
window length it made a variable-BPTT run peak well above a fixed one (``bench/memory.py``).

Here the forward writes the logits into one buffer and, row chunk by row chunk, turns them into
the loss's gradient with respect to the logits, ``softmax(z) - onehot(y)`` (its value does not
depend on anything downstream: the loss is a mean, so the upstream gradient is one scalar). The
backward only scales that buffer's two matmuls. Nothing is recomputed, so it costs no time; the
float32 temporaries are one chunk (about 16 MB) at a time.

Under autocast the matmuls run in the autocast dtype, as ``nn.Linear`` would, and the
log-sum-exp, the loss and the bias gradient in float32, as ``F.cross_entropy(logits.float())``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 22  # float32 elements of one row chunk's temporaries (16 MiB)


class _DecoderCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, weight, bias)  # autocast applies here, as in nn.Linear
        dt = logits.dtype
        n, v = logits.shape
        rows = max(1, CHUNK_ELEMENTS // max(v, 1))
        nll = torch.empty(n, dtype=torch.float32, device=h.device)
        grad = any(ctx.needs_input_grad[:3])
        for z_rows, t, out in zip(logits.split(rows), targets.split(rows), nll.split(rows)):
            z = z_rows.float()  # a copy in low dtypes; the rows themselves in float32
            lse = torch.logsumexp(z, 1)
            out.copy_(lse - z.gather(1, t[:, None]).squeeze(1))
            if grad:  # softmax - onehot, the mean loss's gradient times N, in place of the logits
                z.sub_(lse[:, None]).exp_()
                z.scatter_add_(1, t[:, None], z.new_full((t.numel(), 1), -1.0))
                if z is not z_rows:  # float32 logits were turned in place already
                    z_rows.copy_(z)
        ctx.dtype_h, ctx.dtype_w = h.dtype, weight.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(h.to(dt), weight.to(dt), logits)
        return nll.mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, weight, dz = ctx.saved_tensors  # dz = softmax - onehot, (N, V) in the matmul dtype
        scale = g.float() / dz.size(0)
        gh = gw = gb = None
        if ctx.needs_input_grad[0]:
            gh = (dz @ weight).float().mul_(scale).to(ctx.dtype_h)
        if ctx.needs_input_grad[1]:
            gw = (dz.t() @ h).float().mul_(scale).to(ctx.dtype_w)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            rows = max(1, CHUNK_ELEMENTS // max(dz.size(1), 1))
            gb = sum(chunk.float().sum(0) for chunk in dz.split(rows)).mul_(scale).to(ctx.dtype_w)
        return gh, gw, gb, None


def decoder_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``linear(h, weight, bias)`` against ``targets``, in float32.

    Args: h ``(N, E)``; weight ``(V, E)``; bias ``(V,)`` or None; targets ``(N,)`` ids in ``[0, V)``.
    Equals ``F.cross_entropy(F.linear(h, weight, bias).float(), targets)`` and its gradients up to
    float rounding, with one ``(N, V)`` buffer instead of four."""
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"decoder_cross_entropy: h (N, E) and targets (N,), got {tuple(h.shape)} and "
                         f"{tuple(targets.shape)}")
    return _DecoderCrossEntropy.apply(h, weight, bias, targets)

"""Next-token cross-entropy through the output head without the vocabulary-wide logits.

The logits of a batch are positions x vocabulary floats (4 x 512 x 49,152 for SmolLM2: 400 MB; for a 152K
vocabulary and 4,096-token windows, 10 GB), and autograd keeps several copies of them for backward. Here the
head and the loss run over a chunk of positions at a time, and each chunk's gradients (with respect to its hidden
states, the head's weight and bias) are computed at once in the forward, from the softmax, so no chunk's logits
outlive it. The arithmetic is that of backward (the same three products), so nothing is recomputed.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Mean of cross_entropy(hidden @ weight.T + bias, targets) over the N rows of ``hidden`` (N x H)."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, grad_enabled):
        n, device = hidden.shape[0], hidden.device.type
        want_h, want_w, want_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        # Under autocast the products run in its dtype, as they would outside this function; cast the weight once.
        w = weight.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else weight
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, n, chunk):
            h, y = hidden[i : i + chunk], targets[i : i + chunk]
            logits = torch.nn.functional.linear(h, w, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (want_h or want_w or want_b):
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(len(y), device=g.device), y] -= 1
            g.div_(n)  # d(mean loss) / d(logits) of these rows
            if want_h:
                grad_h[i : i + chunk] = (g.to(w.dtype) @ w).to(hidden.dtype)
            if want_w:
                grad_w += g.T.to(w.dtype) @ h.to(w.dtype)
            if want_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_w else None, grad_b.to(bias.dtype) if want_b else None)
        return total / n

    @staticmethod
    @once_differentiable  # the gradients are constants computed in forward: no second derivative through them
    def backward(ctx, grad_out):
        return (*(None if g is None else g * grad_out for g in ctx.saved_tensors), None, None, None)

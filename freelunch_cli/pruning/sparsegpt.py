"""SparseGPT (Frantar & Alistarh, 2023): prune one linear layer with OBS weight updates.

The layer-wise problem is min ||WX - ŴX||² with Ŵ sparse. Columns are processed left to right in blocks;
within a block the mask is chosen adaptively from the saliency w² / [H⁻¹]_jj², and every pruned weight's
error is compensated by updating the not-yet-processed weights of its row with the inverse Hessian
(H = 2XᵀX/n, dampened by ``damp`` × mean diagonal), taken from the upper Cholesky factor of H⁻¹.
"""

from __future__ import annotations

import torch

from freelunch_cli.pruning.masks import Pattern


class SparseGPT:
    """Accumulate a layer's Hessian from its inputs (``add_batch``), then ``prune`` its weight."""

    def __init__(self, in_features: int, device="cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Running average of 2XᵀX over tokens (as the reference code keeps it)."""
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * (2.0 / self.nsamples) ** 0.5
        self.H.addmm_(x.t(), x)

    @torch.no_grad()
    def prune(
        self, weight: torch.Tensor, pattern: Pattern, block_size: int = 128, damp: float = 0.01
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (updated weight with exact zeros, keep-mask). ``weight`` is not modified."""
        return sparsegpt_prune(weight, self.H, pattern, block_size, damp)


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened H⁻¹, and the mask of dead inputs (never active)."""
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True), dead


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, pattern: Pattern, block_size: int = 128, damp: float = 0.01):
    W = weight.detach().clone().float()
    rows, cols = W.shape
    Hinv, dead = inverse_hessian_factor(H.to(W.device), damp)
    W[:, dead] = 0
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern.kind != "nm":
            saliency = W1**2 / d.reshape(1, -1) ** 2
            if pattern.scope == "row":
                k = int(count * pattern.sparsity)
                idx = torch.sort(saliency, dim=1, stable=True).indices[:, :k]
                prune1.scatter_(1, idx, True)
            else:
                k = int(saliency.numel() * pattern.sparsity)
                idx = torch.sort(saliency.reshape(-1), stable=True).indices[:k]
                prune1.view(-1)[idx] = True
        for i in range(count):
            w = W1[:, i]
            if pattern.kind == "nm" and (i1 + i) % pattern.m == 0:
                sal = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].reshape(1, -1) ** 2
                idx = torch.sort(sal, dim=1, stable=True).indices[:, : pattern.m - pattern.n]
                prune1.scatter_(1, i + idx, True)
            q = w.clone()
            q[prune1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        keep[:, i1:i2] = ~prune1
    W[~keep] = 0
    return W.to(weight.dtype), keep

"""SparseGPT (Frantar & Alistarh, 2023): prune one linear layer with OBS weight updates.

The layer-wise problem is min ||WX - ŴX||² with Ŵ sparse. Columns are processed left to right in blocks;
within a block the mask is chosen adaptively from the saliency w² / [H⁻¹]_jj², and every pruned weight's
error is compensated by updating the not-yet-processed weights of its row with the inverse Hessian
(H = 2XᵀX/n, dampened by ``damp`` × mean diagonal), taken from the upper Cholesky factor of H⁻¹.
"""

from __future__ import annotations

import torch

from freelunch_cli.core.device import exact_matmul
from freelunch_cli.pruning.masks import Pattern


class SingularHessian(ValueError):
    """The dampened Hessian has no Cholesky factor even at the largest dampening tried (its inputs are not finite,
    or far too few)."""

    def __init__(self, damp: float, tokens: int, finite: bool):
        self.damp, self.tokens, self.finite = damp, tokens, finite
        super().__init__(f"singular Hessian (damp up to {damp:g}, {tokens} tokens, finite: {finite})")


MAX_DAMP = 1.0  # dampening doubles as the mean diagonal: the Hessian is then at least half identity


class SparseGPT:
    """Accumulate a layer's Hessian from its inputs (``add_batch``), then ``prune`` its weight.

    ``damp_used`` holds the dampening the last ``prune`` needed: more than asked when the Hessian was singular.
    """

    def __init__(self, in_features: int, device="cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0
        self.damp_used: float | None = None
        self._factor = None

    def add_batch(self, x: torch.Tensor) -> None:
        """Running average of 2XᵀX over tokens (as the reference code keeps it); ``x`` is ``[..., in]``."""
        self._factor = None
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * (2.0 / self.nsamples) ** 0.5
        with exact_matmul():  # full float32 even where TF32 is on, as the reference code keeps it
            self.H.addmm_(x.t(), x)

    @torch.no_grad()
    def prune(
        self, weight: torch.Tensor, pattern: Pattern, block_size: int = 128, damp: float = 0.01
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (updated weight ``[out, in]`` with exact zeros, bool keep-mask). ``weight`` is not modified.

        Raises SingularHessian when no dampening up to MAX_DAMP makes the Hessian invertible.
        """
        with exact_matmul():
            if self._factor is None or self._factor[0] != damp:  # one factorisation for the matrices sharing this input
                self._factor = (damp, *inverse_hessian_factor(self.H, damp, self.nsamples))
            _, Hinv, dead, self.damp_used = self._factor
            return sparsegpt_prune(weight, Hinv, dead, pattern, block_size)


def inverse_hessian_factor(H: torch.Tensor, damp: float, tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Upper Cholesky factor of the dampened H⁻¹ ``[in, in]``, the mask of dead inputs (never active), and the
    dampening used: ``damp`` × mean diagonal, raised tenfold at a time (up to MAX_DAMP) while the factorisation
    fails, as it does for a Hessian of fewer tokens than inputs. Raises SingularHessian beyond that."""
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    finite = bool(torch.isfinite(H).all())
    eye = torch.eye(H.shape[0], device=H.device)
    d = damp
    while finite:
        L, info = torch.linalg.cholesky_ex(H + d * torch.mean(torch.diag(H)) * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and bool(torch.isfinite(U).all()):
                return U, dead, d
        if d >= MAX_DAMP:
            break
        d = min(d * 10, MAX_DAMP)
    raise SingularHessian(d, tokens, finite)


def sparsegpt_prune(weight: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor, pattern: Pattern, block_size: int = 128):
    """SparseGPT's column sweep on ``weight`` ``[out, in]`` with the inverse-Hessian factor (``inverse_hessian_factor``);
    returns (updated float weight in ``weight``'s dtype, bool keep-mask)."""
    W = weight.detach().clone().float()
    rows, cols = W.shape
    Hinv, dead = Hinv.to(W.device), dead.to(W.device)
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

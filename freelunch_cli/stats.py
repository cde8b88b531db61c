"""Calibration statistics of every linear layer's input, gathered with forward hooks."""

from __future__ import annotations

import torch
from torch import nn


class LinearStats:
    """Running statistics of one linear layer's inputs: per-feature sums of squares, optionally XᵀX."""

    def __init__(self, in_features: int, hessian: bool, device):
        self.tokens = 0
        self.sumsq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sumsq += x.pow(2).sum(0).double()
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    def input_norms(self) -> torch.Tensor:
        """||X_j||_2 over every calibration token."""
        return self.sumsq.sqrt().float()

    def hessian(self) -> torch.Tensor:
        """H = 2 XᵀX / tokens, the layer-wise reconstruction Hessian of SparseGPT."""
        return 2.0 * self.xtx / max(self.tokens, 1)


class StatsCollector:
    """Hooks on the given linears; ``with`` it while running calibration batches through the block."""

    def __init__(self, linears: dict[str, nn.Linear], hessian_for: set[str] = frozenset()):
        self.linears = linears
        self.stats = {
            name: LinearStats(lin.in_features, name in hessian_for, lin.weight.device) for name, lin in linears.items()
        }
        self._handles = []

    def __enter__(self):
        for name, lin in self.linears.items():
            st = self.stats[name]
            self._handles.append(lin.register_forward_pre_hook(lambda mod, args, st=st: st.add(args[0].detach())))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

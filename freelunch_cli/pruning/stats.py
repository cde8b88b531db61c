"""Calibration statistics of linear layers' inputs (Wanda's and RIA's input norms), gathered with forward hooks."""

from __future__ import annotations

import torch
from torch import nn


class LinearStats:
    """Per-input-feature sums of squares of one linear layer's inputs."""

    def __init__(self, in_features: int, device="cpu"):
        self.tokens = 0
        self.sumsq = torch.zeros(in_features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sumsq += x.pow(2).sum(0).double()

    def input_norms(self) -> torch.Tensor:
        """||X_j||₂ over every calibration token."""
        return self.sumsq.sqrt().float()


class StatsCollector:
    """Hooks on the given linears; use it as a context while running calibration batches through the block."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.stats = {name: LinearStats(lin.in_features, lin.weight.device) for name, lin in linears.items()}
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

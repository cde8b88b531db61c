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
        """Add the rows of ``x`` ``[..., in_features]``."""
        self.add_sums(squared_sums(x), x.numel() // x.shape[-1])

    def add_sums(self, sumsq: torch.Tensor, tokens: int) -> None:
        self.tokens += tokens
        self.sumsq += sumsq

    def input_norms(self) -> torch.Tensor:
        """||X_j||₂ over every calibration token."""
        return self.sumsq.sqrt().float()


def squared_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-feature sum of squares (float64 ``[in_features]``) of the rows of ``x`` ``[..., in_features]``."""
    return x.reshape(-1, x.shape[-1]).float().pow(2).sum(0).double()


class StatsCollector:
    """Hooks on the given linears; use it as a context while running calibration batches through the block. Linears
    fed the very same input tensor (q/k/v, gate/up) share one computation of its squared sums."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.stats = {name: LinearStats(lin.in_features, lin.weight.device) for name, lin in linears.items()}
        self._handles = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its squared sums) of the latest hook

    def _hook(self, st: LinearStats):
        def hook(mod, args):  # a pre-hook must return None, or it replaces the arguments
            x = args[0].detach()
            if self._last is None or self._last[0] is not args[0]:
                self._last = (args[0], squared_sums(x))
            st.add_sums(self._last[1], x.numel() // x.shape[-1])

        return hook

    def reset(self) -> None:
        """Forget what was gathered (the hooks stay, on the same objects): the batches are run again."""
        for st in self.stats.values():
            st.tokens = 0
            st.sumsq.zero_()
        self._last = None

    def __enter__(self):
        for name, lin in self.linears.items():
            self._handles.append(lin.register_forward_pre_hook(self._hook(self.stats[name])))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None
        return False

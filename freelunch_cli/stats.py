"""Calibration statistics of linear layers' inputs, gathered with forward hooks."""

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


class StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of the block."""


def input_groups(linears: dict[str, nn.Linear], run_once) -> list[list[str]]:
    """Linears that receive the very same input tensor (q/k/v, gate/up) form a group, in call order.

    The inputs are held alive during the pass, so no two distinct inputs can share a memory address.
    """
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(mod, args):  # a pre-hook must return None, or it replaces the arguments
            seen.setdefault(name, args[0])

        return hook

    handles = [lin.register_forward_pre_hook(record(name)) for name, lin in linears.items()]
    try:
        run_once()
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[str]] = {}
    for name, x in seen.items():  # dict order is call order
        groups.setdefault((x.data_ptr(), tuple(x.shape), tuple(x.stride())), []).append(name)
    missing = [n for n in linears if n not in seen]
    return list(groups.values()) + [[n] for n in missing]


def capture_inputs(linear: nn.Linear, sink, run_batches) -> None:
    """Feed every calibration input of ``linear`` to ``sink``, stopping each forward right after it."""

    def hook(mod, args):
        sink(args[0].detach())
        raise StopForward

    h = linear.register_forward_pre_hook(hook)
    try:
        run_batches()
    finally:
        h.remove()

"""Forward hooks that read what a layer receives or returns, and stop the forward pass once they have it."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of the block."""


def input_groups(linears: dict[str, nn.Linear], run_once: Callable[[], object]) -> list[list[str]]:
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


def capture_inputs(linear: nn.Linear, sink: Callable[[torch.Tensor], None], run_batches: Callable[[], object]) -> None:
    """Feed every calibration input of ``linear`` to ``sink``, stopping each forward right after it."""

    def hook(mod, args):
        sink(args[0].detach())
        raise StopForward

    h = linear.register_forward_pre_hook(hook)
    try:
        run_batches()
    finally:
        h.remove()


def capture_linear_io(block: nn.Module, name: str, run: Callable[[], object]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output ``[batch, seq, features]`` of the linear layer ``name`` of ``block`` during ``run()``; the
    rest of the block is skipped."""
    got = {}
    lin = block.get_submodule(name)

    def hook(mod, args, out):
        got["x"], got["y"] = args[0].detach(), out.detach()
        raise StopForward

    h = lin.register_forward_hook(hook)
    try:
        with torch.no_grad():
            run()
    except StopForward:
        pass
    finally:
        h.remove()
    return got["x"], got["y"]

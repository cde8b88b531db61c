"""Reconstruction windows as data: a pure function of the block structure and the granularity.

A window is one unit of local reconstruction. Three kinds cover every granularity, and each kind says, in one
place, what it trains, how its part of the model runs forward, where its input and target come from, and which
file of the chained stream (``--inputs sparse``) it reads, writes and releases:

- ``BlockRange``: blocks ``first``..``last`` whole (``block``, ``blocks:K``, ``model``): the boundary before
  ``first`` -> the dense boundary after ``last``.
- ``AttentionHalf`` and ``MlpHalf`` (``submodule``): the attention with its norm and residual (the block input ->
  the dense residual stream between the halves), then the MLP with its norm and residual (that mid-block stream ->
  the dense block output).
- ``Matrix`` (``matrix``): one linear layer: its input -> the dense layer's output on the dense input.

The kinds see whoever runs them (``engine.runner.WindowRunner``, which owns the files) only as a ``WindowContext``:
the few members below, typed, so a kind cannot reach into the ctx's state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.model.arch import Halves
from freelunch_cli.model.hooks import capture_linear_io
from freelunch_cli.model.skeleton import run_block

GRANULARITIES = "matrix, submodule, block, blocks:K, model"

Batches = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]  # sample indices -> (input, target), float32


class Rows(Protocol):
    """An activation file ``[samples, seqlen, hidden]`` as a context holds it: on disk (``TensorRows``) or resident on
    the device."""

    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def rows(self, start: int, stop: int) -> torch.Tensor: ...

    def take(self, indices) -> torch.Tensor: ...


class WindowContext(Protocol):
    """What a window kind may ask of whoever runs it: activation files, their batches on the device, the block calls,
    the block's halves and the dense references of windows inside a block. ``engine.runner.WindowRunner`` is one."""

    stream: str  # the chained stream of this stage (``recon``, ``quant``)
    sparse_inputs: bool  # --inputs sparse: windows read the chained stream

    @property
    def layout(self) -> Halves:
        """How a block splits into its attention and MLP halves."""
        ...

    def input_stream(self, b: int) -> str:
        """The stream a window starting at block ``b`` reads (the chained one, or dense)."""
        ...

    def rows(self, stream: str, name: str) -> Rows:
        """An activation file ``[samples, seqlen, hidden]`` of a stream, by name (``boundary_003``)."""
        ...

    def load(self, rows: Rows, idx: list[int]) -> torch.Tensor:
        """Rows ``idx`` of an activation file as float32 on the device."""
        ...

    def call(self, i: int, x: torch.Tensor):
        """The arguments block ``i`` is called with for hidden states like ``x`` ``[batch, seqlen, hidden]``."""
        ...

    def dense_mid(self, i: int, x_dense: torch.Tensor) -> torch.Tensor:
        """The dense residual stream between block ``i``'s halves, from its dense input (float32)."""
        ...

    def dense_matrix_io(self, i: int, name: str, x_dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense matrix ``name``'s input and output inside dense block ``i``, from the block's dense input."""
        ...


def boundary(i: int) -> str:
    """Name of the activation file entering block ``i``."""
    return f"boundary_{i:03d}"


def mid(i: int) -> str:
    """Name of the activation file between block ``i``'s attention and MLP halves."""
    return f"mid_{i:03d}"


@dataclass(frozen=True)
class Window:
    """What every window kind has: its index in model order, its granularity and the blocks it spans (inclusive)."""

    index: int
    kind: str  # the granularity: "matrix" | "submodule" | "block" | "blocks" | "model"
    first: int
    last: int

    part = None  # what of the block it covers (None: whole blocks), as window records store it

    @property
    def blocks(self) -> list[int]:
        return list(range(self.first, self.last + 1))

    def label(self) -> str:
        where = f"block {self.first}" if self.first == self.last else f"blocks {self.first}-{self.last}"
        return f"{where} {self.part}" if self.part else where

    def as_dict(self) -> dict:
        """The window as its record in ``windows/NNN.json`` stores it."""
        return {"index": self.index, "kind": self.kind, "first": self.first, "last": self.last, "part": self.part}

    # ---- what trains ---------------------------------------------------------------------------------------
    def module_names(self, ctx: WindowContext) -> tuple[str, ...]:
        """The modules of block ``first`` this window trains (windows inside one block)."""
        raise NotImplementedError

    def trained_modules(self, blocks: dict[int, nn.Module], ctx: WindowContext) -> dict[str, nn.Module]:
        """The modules this window trains, by qualified name ("block/" or "block/module")."""
        return {f"{self.first}/{n}": blocks[self.first].get_submodule(n) for n in self.module_names(ctx)}

    def start_state(
        self, pruned: dict[str, torch.Tensor], current: Callable[[], dict], ctx: WindowContext
    ) -> dict[str, torch.Tensor]:
        """Tensors of a block the window starts from: its own modules pruned, the rest of the block as finished
        windows left it (``current()``)."""
        names = self.module_names(ctx)
        return {**current(), **{k: v for k, v in pruned.items() if any(k.startswith(n + ".") for n in names)}}

    # ---- how it runs and what it learns from ---------------------------------------------------------------
    def forward(self, blocks: dict[int, nn.Module], ctx: WindowContext) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def batches(self, blocks: dict[int, nn.Module], ctx: WindowContext) -> Batches:
        raise NotImplementedError

    def dense_boundaries(self) -> set[int]:
        """Dense boundaries the window reads (inputs, targets, or the block it recomputes dense targets with)."""
        return {self.first, self.first + 1}

    def ends_at_block_output(self) -> bool:
        """Whether the window's output is a block's output (a KL term on the logits can follow the last block)."""
        return True

    # ---- the chained stream (--inputs sparse) -------------------------------------------------------------
    def chained_input(self) -> str | None:
        """The recon-stream file the window reads (None: the embeddings, which are never pruned)."""
        return boundary(self.first) if self.first > 0 else None

    def chained_output(self, num_blocks: int) -> str | None:
        """The recon-stream file the window writes for the next one (None: it writes none)."""
        return boundary(self.last + 1) if self.last + 1 < num_blocks else None

    def chained_release(self) -> list[str]:
        """Recon-stream files no later window reads once this one is done."""
        return [boundary(self.first)] if self.first > 0 else []

    def replay(self, blocks: dict[int, nn.Module], ctx: WindowContext) -> tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]:
        """(stream, file, function): the finished window run, as stored, on its chained input gives its output."""
        return ctx.input_stream(self.first), boundary(self.first), _through(blocks, ctx)


def _through(blocks: dict[int, nn.Module], ctx: WindowContext) -> Callable[[torch.Tensor], torch.Tensor]:
    order = sorted(blocks)

    def forward(x):
        for j in order:
            x = run_block(blocks[j], x, ctx.call(j, x))
        return x

    return forward


@dataclass(frozen=True)
class BlockRange(Window):
    """Whole decoder blocks ``first``..``last``."""

    def trained_modules(self, blocks, ctx):
        return {f"{i}/": b for i, b in blocks.items()}

    def start_state(self, pruned, current, ctx):
        return pruned

    def forward(self, blocks, ctx):
        return _through(blocks, ctx)

    def batches(self, blocks, ctx):
        src = ctx.rows(ctx.input_stream(self.first), boundary(self.first))
        tgt = ctx.rows("dense", boundary(self.last + 1))
        return lambda idx: (ctx.load(src, idx), ctx.load(tgt, idx))

    def dense_boundaries(self):
        return {self.first, self.last + 1}


@dataclass(frozen=True)
class AttentionHalf(Window):
    """The attention submodule of one block, with its norm and residual."""

    part = "attn"

    def module_names(self, ctx):
        return ctx.layout.attention_modules

    def forward(self, blocks, ctx):
        block, i = blocks[self.first], self.first
        return lambda x: ctx.layout.attention(block, x, ctx.call(i, x))

    def batches(self, blocks, ctx):
        i = self.first
        src, dense_in = ctx.rows(ctx.input_stream(i), boundary(i)), ctx.rows("dense", boundary(i))
        return lambda idx: (ctx.load(src, idx), ctx.dense_mid(i, ctx.load(dense_in, idx)))

    def ends_at_block_output(self):
        return False

    def chained_output(self, num_blocks):
        return mid(self.first)

    def chained_release(self):
        return []  # the MLP half releases the block's input: replaying this half needs it

    def replay(self, blocks, ctx):
        return ctx.input_stream(self.first), boundary(self.first), self.forward(blocks, ctx)


@dataclass(frozen=True)
class MlpHalf(Window):
    """The MLP submodule of one block, with its norm and residual; it reads the stream between the halves."""

    part = "mlp"

    def module_names(self, ctx):
        return ctx.layout.mlp_modules

    def forward(self, blocks, ctx):
        block = blocks[self.first]
        return lambda h: ctx.layout.feed_forward(block, h)

    def batches(self, blocks, ctx):
        i = self.first
        tgt = ctx.rows("dense", boundary(i + 1))
        if ctx.sparse_inputs:  # the reconstructed attention's output, as stored
            src = ctx.rows(ctx.stream, mid(i))
            return lambda idx: (ctx.load(src, idx), ctx.load(tgt, idx))
        dense_in = ctx.rows("dense", boundary(i))
        return lambda idx: (ctx.dense_mid(i, ctx.load(dense_in, idx)), ctx.load(tgt, idx))

    def chained_input(self):
        return mid(self.first)

    def chained_release(self):
        return [mid(self.first)] + super().chained_release()

    def replay(self, blocks, ctx):
        return ctx.stream, mid(self.first), self.forward(blocks, ctx)


@dataclass(frozen=True)
class Matrix(Window):
    """One linear layer of one block. The last matrix of a block writes the block's chained output."""

    name: str = ""
    last_in_block: bool = False

    @property
    def part(self) -> str:
        return self.name

    def module_names(self, ctx):
        return (self.name,)

    def forward(self, blocks, ctx):
        return blocks[self.first].get_submodule(self.name)

    def batches(self, blocks, ctx):
        i, name, block = self.first, self.name, blocks[self.first]
        dense_in = ctx.rows("dense", boundary(i))
        if not ctx.sparse_inputs:

            def dense_io(idx):
                x, y = ctx.dense_matrix_io(i, name, ctx.load(dense_in, idx))
                return x.float(), y.float()

            return dense_io
        src = ctx.rows(ctx.input_stream(i), boundary(i))

        def chained_io(idx):  # the input as the block, with the finished matrices, gives it on the chained stream
            _, y = ctx.dense_matrix_io(i, name, ctx.load(dense_in, idx))
            xs = ctx.load(src, idx)
            x, _ = capture_linear_io(block, name, lambda: run_block(block, xs, ctx.call(i, xs)))
            return x.float(), y.float()

        return chained_io

    def ends_at_block_output(self):
        return False

    def chained_output(self, num_blocks):
        return super().chained_output(num_blocks) if self.last_in_block else None

    def chained_release(self):
        return super().chained_release() if self.last_in_block else []


def parse_granularity(window: str) -> tuple[str, int]:
    """(kind, blocks per window) of ``--window``; raises FreelunchError for an unknown one."""
    w = window.strip().lower()
    if w in ("matrix", "submodule", "block", "model"):
        return w, 1
    m = re.fullmatch(r"blocks:(\d+)", w)
    if m and int(m.group(1)) >= 1:
        return "blocks", int(m.group(1))
    raise FreelunchError(f"unknown window {window!r}: choose one of {GRANULARITIES}")


def enumerate_windows(num_blocks: int, window: str, matrices: list[str] | None = None) -> list[Window]:
    """Windows in model order. ``matrices``: the linear layers of a block, in call order (matrix windows)."""
    kind, k = parse_granularity(window)
    if kind == "model":
        return [BlockRange(0, "model", 0, num_blocks - 1)]
    if kind == "matrix":
        if not matrices:
            raise FreelunchError("matrix windows need the block's linear layers")
        return [
            Matrix(b * len(matrices) + j, "matrix", b, b, name, j == len(matrices) - 1)
            for b in range(num_blocks)
            for j, name in enumerate(matrices)
        ]
    if kind == "submodule":
        return [
            w for b in range(num_blocks) for w in (AttentionHalf(2 * b, "submodule", b, b), MlpHalf(2 * b + 1, "submodule", b, b))
        ]
    return [BlockRange(idx, kind, first, min(first + k, num_blocks) - 1) for idx, first in enumerate(range(0, num_blocks, k))]

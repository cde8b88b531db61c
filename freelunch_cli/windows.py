"""Reconstruction windows as data: a pure function of the block structure and the granularity."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from freelunch_cli.errors import FreelunchError


@dataclass(frozen=True)
class Window:
    """One unit of local reconstruction.

    ``first``..``last`` are the decoder blocks it spans (inclusive). ``part`` narrows a one-block window
    to its attention half (``attn``), its MLP half (``mlp``) or one matrix (its name in the block).
    Input and target:

    - whole blocks: the boundary before ``first`` -> the dense boundary after ``last``;
    - ``attn``: the boundary before the block -> the dense residual stream between the halves;
    - ``mlp``: that mid-block stream -> the dense boundary after the block;
    - a matrix: the matrix's input -> the dense matrix's output on the dense input.
    """

    index: int
    kind: str  # "matrix" | "submodule" | "block" | "blocks" | "model"
    first: int
    last: int
    part: str | None = None

    @property
    def blocks(self) -> list[int]:
        return list(range(self.first, self.last + 1))

    @property
    def whole_blocks(self) -> bool:
        return self.part is None

    def label(self) -> str:
        where = f"block {self.first}" if self.first == self.last else f"blocks {self.first}-{self.last}"
        return f"{where} {self.part}" if self.part else where

    def as_dict(self) -> dict:
        return asdict(self)


GRANULARITIES = "matrix, submodule, block, blocks:K, model"


def parse_granularity(window: str) -> tuple[str, int]:
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
    out: list[Window] = []
    if kind == "model":
        return [Window(0, "model", 0, num_blocks - 1)]
    if kind == "matrix":
        if not matrices:
            raise FreelunchError("matrix windows need the block's linear layers")
        for b in range(num_blocks):
            out += [Window(len(out) + j, "matrix", b, b, name) for j, name in enumerate(matrices)]
        return out
    if kind == "submodule":
        for b in range(num_blocks):
            out += [Window(2 * b, "submodule", b, b, "attn"), Window(2 * b + 1, "submodule", b, b, "mlp")]
        return out
    for idx, first in enumerate(range(0, num_blocks, k)):
        out.append(Window(idx, kind, first, min(first + k, num_blocks) - 1))
    return out

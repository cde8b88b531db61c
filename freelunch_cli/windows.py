"""Reconstruction windows as data: a pure function of the number of blocks and the granularity."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from freelunch_cli.errors import FreelunchError


@dataclass(frozen=True)
class Window:
    """One unit of local reconstruction.

    ``first``..``last`` are the decoder blocks it spans (inclusive). It reads its input at the boundary
    before block ``first`` and is trained to match the dense activation at the boundary after ``last``.
    """

    index: int
    kind: str  # "block" | "blocks" | "model"
    first: int
    last: int

    @property
    def blocks(self) -> list[int]:
        return list(range(self.first, self.last + 1))

    @property
    def input_boundary(self) -> int:
        return self.first

    @property
    def target_boundary(self) -> int:
        return self.last + 1

    def label(self) -> str:
        return f"block {self.first}" if self.first == self.last else f"blocks {self.first}-{self.last}"

    def as_dict(self) -> dict:
        return asdict(self)


GRANULARITIES = "block, blocks:K, model"


def parse_granularity(window: str) -> tuple[str, int]:
    w = window.strip().lower()
    if w == "block":
        return "block", 1
    if w == "model":
        return "model", 0
    m = re.fullmatch(r"blocks:(\d+)", w)
    if m and int(m.group(1)) >= 1:
        return "blocks", int(m.group(1))
    raise FreelunchError(f"unknown window {window!r}: choose one of {GRANULARITIES}")


def enumerate_windows(num_blocks: int, window: str) -> list[Window]:
    kind, k = parse_granularity(window)
    if kind == "model":
        return [Window(0, "model", 0, num_blocks - 1)]
    out = []
    for idx, first in enumerate(range(0, num_blocks, k)):
        out.append(Window(idx, kind, first, min(first + k, num_blocks) - 1))
    return out

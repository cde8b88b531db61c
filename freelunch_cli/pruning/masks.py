"""Sparsity patterns as pure functions of a score matrix: which weights to keep.

A score is a ``[out, in]`` tensor, higher = more important. Ties are broken by position (stable sort),
so the count of zeros is always exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from freelunch_cli.core.errors import FreelunchError


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` at ``sparsity`` per row or per matrix, or ``N:M`` (at most N nonzeros per M inputs)."""

    kind: str  # "unstructured" | "nm"
    sparsity: float
    scope: str = "row"  # "row" | "matrix" (unstructured only)
    n: int = 0
    m: int = 0

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"{self.sparsity:g} unstructured per {self.scope}"

    def zeros_per_row(self, cols: int) -> int:
        return int(cols * self.sparsity)


def parse_sparsity(value) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise FreelunchError(f"--sparsity must be a number in (0, 1), got {value!r}") from None
    if not 0.0 < s < 1.0:
        raise FreelunchError(f"--sparsity must be in (0, 1), got {value}")
    return s


def parse_pattern(pattern: str | None, sparsity, scope: str = "row") -> Pattern:
    if scope not in ("row", "matrix"):
        raise FreelunchError(f"--scope must be row or matrix, got {scope!r}")
    if pattern is None or pattern == "unstructured":
        return Pattern("unstructured", parse_sparsity(0.5 if sparsity is None else sparsity), scope)
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not m:
        raise FreelunchError(f"--pattern must look like N:M (e.g. 2:4) or 'unstructured', got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise FreelunchError(f"--pattern {pattern}: N:M needs 0 < N < M (N nonzeros kept in every M weights)")
    return Pattern("nm", 1.0 - n / mm, "group", n, mm)


def check_fits(pattern: Pattern, shape: tuple[int, int], name: str) -> None:
    if pattern.kind == "nm" and shape[1] % pattern.m:
        raise FreelunchError(
            f"pattern {pattern.n}:{pattern.m} does not fit {name}: its {shape[1]} inputs are not divisible by {pattern.m}"
        )


def keep_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Boolean ``[out, in]`` mask, True where the weight is kept."""
    rows, cols = score.shape
    score = score.float()
    keep = torch.ones(rows, cols, dtype=torch.bool, device=score.device)
    if pattern.kind == "nm":
        if cols % pattern.m:
            raise FreelunchError(f"pattern {pattern.n}:{pattern.m} does not fit {cols} inputs")
        groups = score.reshape(rows, cols // pattern.m, pattern.m)
        order = torch.sort(groups, dim=-1, stable=True).indices[..., : pattern.m - pattern.n]
        g = keep.reshape(rows, cols // pattern.m, pattern.m)
        g.scatter_(-1, order, False)
        return keep
    if pattern.scope == "row":
        return ~lowest(score, pattern.zeros_per_row(cols))
    return ~lowest(score.reshape(1, -1), int(score.numel() * pattern.sparsity)).reshape(rows, cols)


def lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` lowest scores of each row of ``score`` ``[rows, cols]``, ties taken in position order:
    the first ``k`` of a stable ascending sort, found with a selection (``kthvalue``, linear time) instead."""
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = score.kthvalue(k, dim=1, keepdim=True).values
    below = score < kth
    ties = score == kth
    wanted = k - below.sum(1, keepdim=True)  # how many of the ties the first k positions of the sort hold
    return below | (ties & (ties.cumsum(1) <= wanted))

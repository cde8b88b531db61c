"""Pruning criteria: pure functions from a weight and its calibration statistics to a score.

Higher score = more important. Statistics come from ``stats.LinearStats`` (per-input sums of squares,
and for SparseGPT the Hessian).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from freelunch_cli.errors import FreelunchError


@dataclass(frozen=True)
class Criterion:
    name: str
    needs: str | None  # None | "norms" | "hessian"
    default_scope: str
    score: Callable | None  # (weight, stats, options) -> score; None for methods that prune themselves


def magnitude_score(weight: torch.Tensor, stats=None, opts=None) -> torch.Tensor:
    return weight.float().abs()


def wanda_score(weight: torch.Tensor, stats, opts=None) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (Sun et al., 2024)."""
    return weight.float().abs() * stats.input_norms().to(weight.device)[None, :]


CRITERIA: dict[str, Criterion] = {
    "magnitude": Criterion("magnitude", None, "matrix", magnitude_score),
    "wanda": Criterion("wanda", "norms", "row", wanda_score),
}


def get_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise FreelunchError(f"unknown criterion {name!r}: choose one of {', '.join(CRITERIA)}") from None

"""Pruning criteria: pure functions from a weight and its calibration statistics to a score.

Higher score = more important. Statistics come from ``stats.LinearStats`` (per-input sums of squares).
SparseGPT, which updates the weights while it prunes, lives in ``sparsegpt.py``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from freelunch_cli.core.errors import FreelunchError


@dataclass(frozen=True)
class ScoreOptions:
    seed: int = 0
    ria_alpha: float = 0.5


@dataclass(frozen=True)
class Criterion:
    name: str
    needs: str | None  # None | "norms" | "hessian"
    default_scope: str
    score: Callable | None  # (weight, stats, options, key) -> score; None for SparseGPT


def magnitude_score(weight, stats=None, opts=None, key: str = "") -> torch.Tensor:
    return weight.float().abs()


def random_score(weight, stats=None, opts: ScoreOptions = ScoreOptions(), key: str = "") -> torch.Tensor:
    """Seeded uniform scores, a different stream per matrix: the floor every criterion must beat."""
    g = torch.Generator().manual_seed(opts.seed * 1_000_003 + zlib.crc32(key.encode()))
    return torch.rand(weight.shape, generator=g).to(weight.device)


def wanda_score(weight, stats, opts=None, key: str = "") -> torch.Tensor:
    """|W_ij| · ||X_j||₂ (Sun et al., 2024)."""
    return weight.float().abs() * stats.input_norms().to(weight.device)[None, :]


def ria_score(weight, stats, opts: ScoreOptions = ScoreOptions(), key: str = "") -> torch.Tensor:
    """Relative importance and activations (Zhang et al., 2024): (|W|/Σ_row|W| + |W|/Σ_col|W|) · ||X_j||₂^α."""
    a = weight.float().abs()
    relative = a / a.sum(dim=1, keepdim=True).clamp_min(1e-30) + a / a.sum(dim=0, keepdim=True).clamp_min(1e-30)
    return relative * stats.input_norms().to(weight.device)[None, :] ** opts.ria_alpha


CRITERIA: dict[str, Criterion] = {
    "magnitude": Criterion("magnitude", None, "matrix", magnitude_score),
    "random": Criterion("random", None, "matrix", random_score),
    "wanda": Criterion("wanda", "norms", "row", wanda_score),
    "ria": Criterion("ria", "norms", "row", ria_score),
    "sparsegpt": Criterion("sparsegpt", "hessian", "matrix", None),
}


def get_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise FreelunchError(f"unknown criterion {name!r}: choose one of {', '.join(CRITERIA)}") from None

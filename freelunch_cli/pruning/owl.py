"""OWL (Yin et al., 2024): outlier-weighted layer-wise sparsity, chosen before pruning.

Blocks whose Wanda scores hold more outliers (scores above ``m`` times the block's mean score) keep more
weights. The outlier ratios are scaled to a band of width 2·``lam`` around the target density, so the mean
sparsity over blocks equals the requested one.
"""

from __future__ import annotations

import torch

from freelunch_cli.core.errors import FreelunchError


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all scores of a block above ``m`` times their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def layer_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL's mapping: densities linear in the outlier ratio, spread over [d - lam, d + lam], mean d = 1 - sparsity."""
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [sparsity] * len(ratios)
    dens = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(dens) / len(dens)
    out = [1.0 - (d - mean + (1.0 - sparsity)) for d in dens]
    if min(out) <= 0 or max(out) >= 1:
        raise FreelunchError(f"--owl {lam} moves some block's sparsity outside (0, 1); use a smaller --owl")
    return out

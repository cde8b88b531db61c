"""OWL (Yin et al., 2024): outlier-weighted layer-wise sparsity, chosen before pruning.

Blocks whose Wanda scores hold more outliers (scores above ``m`` times the block's mean score) keep more
weights. The outlier ratios are scaled to a band of width 2·``lam`` around the target density, so the mean
sparsity over blocks equals the requested one.
"""

from __future__ import annotations

import torch

from freelunch_cli.arch import block_linears
from freelunch_cli.criteria import wanda_score
from freelunch_cli.errors import FreelunchError
from freelunch_cli.skeleton import run_block
from freelunch_cli.stats import StatsCollector
from freelunch_cli.storage import TensorRows, load_tensors


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


def block_outlier_ratios(work, sk, linears_filter, samples: int, batch_size: int, device, compute, m: float, log=None) -> list[float]:
    """One statistics pass over the dense blocks on the dense activations."""
    ratios = []
    for i in range(sk.num_blocks):
        block = sk.build_block(i, load_tensors(work.stage_block_path("dense", i)))
        linears = {k: v for k, v in block_linears(block).items() if linears_filter(k)}
        inputs = TensorRows(work.check_file(work.boundary_path("dense", i)))
        collector = StatsCollector(linears)
        with torch.no_grad(), collector:
            for s in range(0, samples, batch_size):
                x = inputs.rows(s, min(s + batch_size, samples)).to(device, compute)
                run_block(block, x, sk.block_call(i, x.shape[0], x.shape[1]))
        scores = [wanda_score(lin.weight, collector.stats[name]) for name, lin in linears.items()]
        ratios.append(outlier_ratio(scores, m))
        if log is not None:
            log(f"  block {i:3d}: outlier ratio {ratios[-1]:.4f}")
    return ratios

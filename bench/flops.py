"""FLOP counts of the stages and the machine's measured matrix-product peak, shared by bench/throughput.py (CPU) and
bench/gpu_check.py (GPU).

Counts follow the usual convention: a forward pass costs 2 FLOPs per weight per token in the linear layers, plus the
causal attention's 2 x seqlen x (heads x head_dim) per token and block (QKᵀ and AV over half the sequence on
average); training costs three forward passes (forward, and the two products of backward).
"""

from __future__ import annotations

import time

import torch


def linear_params_per_block(config) -> int:
    """Weights of one decoder block's linear layers (Llama layout: q, k, v, o, gate, up, down)."""
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * config.intermediate_size


def block_forward_flops(config, tokens: int, seqlen: int) -> float:
    """FLOPs of one block's forward pass over ``tokens`` tokens in sequences of ``seqlen``."""
    heads = config.num_attention_heads
    attn_width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return tokens * (2 * linear_params_per_block(config) + 2 * seqlen * attn_width)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 10) -> float:
    """The best FLOP/s of square matrix products of size ``n`` (8192 on a GPU, 1536 on a CPU) in ``dtype``."""
    n = n or (8192 if device.type == "cuda" else 1536)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best


def sha256_rate(megabytes: int = 256) -> float:
    """Bytes per second this machine hashes with sha256 (one thread)."""
    import hashlib

    data = b"\x01" * (megabytes << 20)
    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return len(data) / (time.perf_counter() - t0)

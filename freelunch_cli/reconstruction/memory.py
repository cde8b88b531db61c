"""Peak-memory estimates of each window kind, and the choice of ``--window auto``.

Training a window holds: its parameters in float32 (4 B), their gradients (4 B) and AdamW's two moments
(8 B); the activations autograd saves for the backward pass (per token and block, about
10·hidden + 4·intermediate + 3·kv_dim values, attention computed by SDPA without an L×L matrix); two
batches of inputs and targets (the one training and the next, staged by the prefetching thread); and for
submodule and matrix windows a frozen dense copy of the block that computes their targets. The estimate is
deliberately simple; it is printed so it can be checked.

What the estimate leaves free is what a window may hold resident (its activation files, read once instead of
once per step): ``resident_budget``. So a window ``--window auto`` chose never runs out of memory because the
runner filled the rest.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.units import is_plain_number, parse_size
from freelunch_cli.model.arch import block_linears


def parse_memory(text: str, device: torch.device) -> int:
    """Bytes of ``--max-memory``: a size (``40GiB``, ``500MB``, a byte count) or a fraction (``0.8``) of the device's
    memory. Raises FreelunchError for anything else."""
    if is_plain_number(text) and float(text) <= 1.0:
        return int(float(text) * device_memory(device))
    return parse_size(text, "--max-memory")


def device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def block_numbers(config, template: nn.Module) -> dict:
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * hidden)
    heads = config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or hidden // heads)
    params = sum(p.numel() for p in template.parameters())
    largest_linear = max(
        lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0) for lin in block_linears(template).values()
    )
    attn_params = sum(p.numel() for n, p in template.named_parameters() if "attn" in n)
    return {
        "hidden": hidden,
        "inter": inter,
        "kv": kv,
        "params": params,
        "largest_linear": largest_linear,
        "largest_half": max(attn_params, params - attn_params),
    }


def estimate(kind: str, blocks: int, nums: dict, batch: int, seqlen: int, act_bytes: int = 4) -> dict:
    """Bytes of one window of ``kind`` spanning ``blocks`` blocks."""
    tokens = batch * seqlen
    h = nums["hidden"]
    per_token_block = 10 * h + 4 * nums["inter"] + 3 * nums["kv"]
    if kind == "matrix":
        params, acts, frozen = nums["largest_linear"], tokens * (h + nums["inter"]) * 2, nums["params"]
    elif kind == "submodule":
        params, acts, frozen = nums["largest_half"], tokens * per_token_block, nums["params"]
    else:
        params, acts, frozen = nums["params"] * blocks, tokens * per_token_block * blocks, 0
    out = {
        "trainable_params": params,
        "weights_grads_adam": 16 * params,
        "activations": acts * act_bytes,
        "batch_io": 2 * 2 * tokens * h * 4,  # inputs and targets, float32: this batch and the prefetched one
        "frozen_dense": frozen * act_bytes,
    }
    out["total"] = sum(v for k, v in out.items() if k != "trainable_params")
    return out


def candidates(num_blocks: int) -> list[tuple[str, int]]:
    """Window kinds from largest to smallest: model, blocks:K (halving), block, submodule, matrix."""
    out = [("model", num_blocks)]
    k = num_blocks // 2
    while k >= 2:
        out.append((f"blocks:{k}", k))
        k //= 2
    return out + [("block", 1), ("submodule", 1), ("matrix", 1)]


def choose_window(
    num_blocks: int, nums: dict, batch: int, seqlen: int, budget: int, act_bytes: int = 4
) -> tuple[str, list[dict]]:
    """The largest window kind whose estimate fits ``budget``; and the table of every estimate."""
    table = []
    chosen = None
    for name, k in candidates(num_blocks):
        kind = name.split(":")[0]
        est = estimate(kind, k, nums, batch, seqlen, act_bytes)
        est["window"] = name
        est["fits"] = est["total"] <= budget
        table.append(est)
        if chosen is None and est["fits"]:
            chosen = name
    if chosen is None:
        smallest = table[-1]["total"]
        raise FreelunchError(
            f"no window fits --max-memory {budget / 2**30:.2f} GiB (a single matrix needs about "
            f"{smallest / 2**30:.2f} GiB); lower --batch-size or raise --max-memory"
        )
    return chosen, table


def resident_budget(free: int, need: int, share: float, limit: int | None = None) -> int:
    """Bytes of activation files a window may keep on its device: at most ``share`` of the ``free`` bytes there, and
    never what its training ``need``-s (``estimate(...)["total"]``): ``min(share · L, L - need)`` with L the free
    bytes, or ``limit`` (``--max-memory``) when that is smaller; 0 when nothing is left."""
    budget = free if limit is None else min(free, limit)
    return max(0, min(int(share * budget), budget - need))

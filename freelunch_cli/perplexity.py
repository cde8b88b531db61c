"""Perplexity with the WikiText protocol: one token stream, non-overlapping windows, tail dropped."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from freelunch_cli.skeleton import Skeleton, run_block


def split_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)


def chunk_size(hidden_size: int, seqlen: int, batch_size: int, memory_budget: int = 1 << 30) -> int:
    """Windows whose hidden states (float32) fit the budget, a multiple of the batch size."""
    per_window = seqlen * hidden_size * 4
    return max(batch_size, (memory_budget // per_window) // batch_size * batch_size)


@torch.no_grad()
def perplexity(sk: Skeleton, windows: torch.Tensor, batch_size: int = 4, memory_budget: int = 1 << 30, on_block=None) -> dict:
    """Exact mean next-token NLL over every predicted token of every window, streaming block by block.

    Hidden states of as many windows as fit ``memory_budget`` are kept while each block is loaded
    once per chunk, so peak memory is one block plus one chunk of activations.
    """
    n, seqlen = windows.shape
    chunk = chunk_size(sk.config.hidden_size, seqlen, batch_size, memory_budget)
    nll, tokens = 0.0, 0
    for c0 in range(0, n, chunk):
        part = windows[c0 : c0 + chunk]
        hidden = [sk.embed(part[s : s + batch_size]) for s in range(0, len(part), batch_size)]
        for i in range(sk.num_blocks):
            block = sk.build_block(i)
            hidden = [run_block(block, h, sk.block_call(i, h.shape[0], h.shape[1])) for h in hidden]
            del block
            if on_block is not None:
                on_block()
        for s, h in zip(range(0, len(part), batch_size), hidden):
            labels = part[s : s + batch_size].to(sk.device)
            for j in range(h.shape[0]):  # one window at a time: logits are [seqlen, vocab]
                logits = sk.logits(h[j : j + 1])[0, :-1].float()
                nll += float(F.cross_entropy(logits, labels[j, 1:], reduction="sum"))
                tokens += seqlen - 1
    return {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens, "windows": n, "seqlen": seqlen}

"""Perplexity with the WikiText protocol: one token stream cut into non-overlapping sequences, the tail dropped."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from freelunch_cli.model.skeleton import Skeleton, run_block


def split_sequences(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping sequences ``[n, seqlen]`` of a token stream ``[tokens]``, the tail dropped; at most ``limit``."""
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)


def chunk_size(hidden_size: int, seqlen: int, batch_size: int, memory_budget: int = 1 << 30) -> int:
    """Sequences whose hidden states (float32) fit ``memory_budget`` bytes, a multiple of the batch size."""
    per_sequence = seqlen * hidden_size * 4
    return max(batch_size, (memory_budget // per_sequence) // batch_size * batch_size)


@torch.no_grad()
def perplexity(sk: Skeleton, sequences: torch.Tensor, batch_size: int = 4, memory_budget: int = 1 << 30, on_block=None) -> dict:
    """Exact mean next-token NLL over every predicted token of ``sequences`` ``[n, seqlen]``, streaming block by block.

    Hidden states of as many sequences as fit ``memory_budget`` bytes are kept while each block is loaded
    once per chunk, so peak memory is one block plus one chunk of activations. Returns ppl, nll (nats per token),
    tokens, the number of sequences (as "windows") and seqlen.
    """
    n, seqlen = sequences.shape
    chunk = chunk_size(sk.config.hidden_size, seqlen, batch_size, memory_budget)
    nll, tokens = 0.0, 0
    for c0 in range(0, n, chunk):
        part = sequences[c0 : c0 + chunk]
        hidden = [sk.embed(part[s : s + batch_size]) for s in range(0, len(part), batch_size)]
        for i in range(sk.num_blocks):
            block = sk.build_block(i)
            hidden = [run_block(block, h, sk.block_call(i, h.shape[0], h.shape[1])) for h in hidden]
            del block
            if on_block is not None:
                on_block()
        for s, h in zip(range(0, len(part), batch_size), hidden):
            labels = part[s : s + batch_size].to(sk.device)
            for j in range(h.shape[0]):  # one sequence at a time: logits are [seqlen, vocab]
                logits = sk.logits(h[j : j + 1])[0, :-1].float()
                nll += float(F.cross_entropy(logits, labels[j, 1:], reduction="sum"))
                tokens += seqlen - 1
    return {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens, "windows": n, "seqlen": seqlen}

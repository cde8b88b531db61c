"""Peak memory per process of global retraining, whole (one process) or sharded with FSDP2 over ``world`` processes,
and the number of GPUs a run needs: what ``retrain`` checks before it builds anything.

Sharded over the processes (divided by ``world``): every weight in float32 (4 B; frozen ones too), the gradients
and AdamW's two moments of the trainable parameters (12 B), and the keep-masks (1 B per masked weight). Held whole
by each process: the embeddings, final norm and head while the model runs and two decoder blocks at a time (the one
computing and the one FSDP prefetches), in the compute dtype, with one block's float32 gradients before they are
reduced; and the activations of its share of the batch (per token and block about 10·hidden + 4·intermediate +
3·kv values, as ``reconstruction.memory`` counts them; with ``--grad-checkpoint`` only each block's input plus one
block, and the head in chunks). A deliberately simple estimate: it is printed so it can be checked.
"""

from __future__ import annotations

import math

GIB = 2**30


def retrain_estimate(
    nums: dict,
    blocks: int,
    rest_params: int,
    vocab: int,
    trainable: int,
    masked: int,
    batch: int,
    seqlen: int,
    world: int,
    compute_bytes: int,
    checkpointing: bool,
    head_chunk: int,
    trains_rest: bool = False,
    masks_gathered: bool = False,
) -> dict:
    """Bytes per process, by part, and their ``total``.

    ``nums``: one block's numbers (``reconstruction.memory.block_numbers``: params, hidden, inter, kv);
    ``rest_params``: embeddings, final norm and head; ``trainable``: parameters the optimizer updates; ``masked``:
    weights with a keep-mask; ``batch``: sequences per step over all processes (each takes ``batch / world``);
    ``compute_bytes``: 2 for bfloat16 or float16, 4 for float32; ``trains_rest``: the embeddings and head train (full
    retraining), so their float32 gradient exists whole in each process before it is reduced, and the chunked head
    loss keeps the head's gradient from forward to backward; ``masks_gathered``: the keep-masks are gathered with
    their block (masked-LoRA's, one byte a weight).
    """
    total_params = nums["params"] * blocks + rest_params
    tokens = math.ceil(batch / world) * seqlen
    per_token_block = 10 * nums["hidden"] + 4 * nums["inter"] + 3 * nums["kv"]
    head_weight = vocab * nums["hidden"]
    if checkpointing:
        acts = tokens * (blocks * nums["hidden"] + per_token_block) * compute_bytes
        head = min(head_chunk, tokens) * vocab * 4 * 2 + (head_weight * (4 + compute_bytes) if trains_rest else 0)
    else:
        acts = tokens * blocks * per_token_block * compute_bytes
        head = tokens * vocab * 4 * 3
    gathered = 0
    if world > 1:
        block_grads = 4 * nums["params"] if trainable >= nums["params"] else 0  # a whole block's, before reduction
        gathered = (2 * nums["params"] + rest_params) * compute_bytes + block_grads + (4 * rest_params if trains_rest else 0)
        gathered += 2 * masked // blocks if masks_gathered else 0
    out = {
        "weights": 4 * total_params // world,
        "grads_adam": 12 * trainable // world,
        "masks": masked // world,
        "gathered": gathered,
        "activations": acts,
        "head": head,
    }
    out["total"] = sum(out.values())
    return out


def processes_needed(estimate_for, budget: int, most: int = 4096) -> int | None:
    """The fewest processes (GPUs) whose per-process estimate fits ``budget`` bytes, or None up to ``most``.

    ``estimate_for(world)`` gives the estimate's dict for a world size."""
    candidates = list(range(1, 9)) + [2**k for k in range(4, int(math.log2(most)) + 1)]  # a node, then whole nodes
    return next((w for w in candidates if estimate_for(w)["total"] <= budget), None)


def describe(est: dict, world: int) -> str:
    """``41.2 GiB per process on 8 processes (weights 17.5, gradients and AdamW 52.5, ...)``."""
    parts = ", ".join(
        f"{label} {est[key] / GIB:.1f}"
        for key, label in (
            ("weights", "weights"),
            ("grads_adam", "gradients and AdamW"),
            ("masks", "masks"),
            ("gathered", "gathered blocks"),
            ("activations", "activations"),
            ("head", "head"),
        )
        if est[key]
    )
    who = "in one process" if world == 1 else f"per process on {world} processes"
    return f"{est['total'] / GIB:.1f} GiB {who} ({parts} GiB)"

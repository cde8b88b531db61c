"""Next-token training of a whole causal LM with its masks kept (global retraining): what trains, the loss through
a chunked head, and per-block recomputation."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from freelunch_cli.model.arch import block_linears
from freelunch_cli.training.head_loss import linear_cross_entropy
from freelunch_cli.training.loop import MaskedParams
from freelunch_cli.training.peft import PeftConfig, Trainable, prepare

HEAD_CHUNK = 512  # positions per chunk of the head and loss under --grad-checkpoint: 512 x 49,152 floats = 100 MB


def next_token_loss(model: nn.Module, batch: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (float32 scalar) of ``batch`` ``[b, seqlen]`` (token ids).

    With ``chunk``, the head and the loss run ``chunk`` positions at a time with their gradients taken on the way
    (``head_loss``), so the vocabulary-wide logits never exist whole: the head's share of --grad-checkpoint, at no
    extra compute.
    """
    targets = batch[:, 1:].reshape(-1)
    if chunk is None:
        logits = model(input_ids=batch, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets)
    hidden = model.base_model(input_ids=batch, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    return linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets, chunk)


def choose_trainable(model: nn.Module, layers, masks: dict[str, torch.Tensor], peft: PeftConfig) -> Trainable:
    """What trains, with ``masks`` (bool keep-masks by "block/matrix" name) held.

    full: every parameter (embeddings and head too), pruned weights held at zero; bias-norm: every bias and norm of
    the model, the final norm included; lora / masked-lora: adapters on the blocks' linear layers.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if peft.variant in ("lora", "masked-lora"):
        return prepare({f"{i}/": block for i, block in enumerate(layers)}, masks, peft)
    linears = {f"{i}/{name}": lin for i, block in enumerate(layers) for name, lin in block_linears(block).items()}
    if peft.variant == "bias-norm":
        return Trainable(prepare({"model": model}, {}, peft).params, linears, masks, lora=False)
    for p in model.parameters():
        p.requires_grad_(True)
    by_id = {id(linears[q].weight): keep for q, keep in masks.items()}
    return Trainable(MaskedParams(list(model.parameters()), by_id), linears, masks, lora=False)


def recompute_in_backward(layers) -> None:
    """Gradient checkpointing per decoder block: the forward keeps only each block's input and backward reruns the
    block, so activation memory is one block's instead of the whole model's. Done here rather than through
    transformers' switch, which only acts in train mode (we train in eval mode: no dropout, as in every other stage)."""
    for block in layers:
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


class NextTokenLoss(nn.Module):
    """A causal LM with its next-token loss as its forward (``batch [b, seqlen]`` token ids -> float32 scalar).

    Sharded retraining makes this the root FSDP unit, so the embeddings, final norm and head are gathered around the
    whole step, the chunked head (which reads the head's weight directly) included."""

    def __init__(self, lm: nn.Module, chunk: int | None):
        super().__init__()
        self.lm = lm
        self.chunk = chunk

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return next_token_loss(self.lm, batch, self.chunk)

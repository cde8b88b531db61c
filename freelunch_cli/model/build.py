"""Building a causal LM's modules from its config: the attention implementation it supports, no KV cache, experts
split into per-expert linear layers, buffers no checkpoint holds, and the sequence lengths it can take."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.model.moe import split_experts


def model_class(config):
    """The ``transformers`` causal-LM class of ``config`` (None for a model with custom code)."""
    return AutoModelForCausalLM._model_mapping.get(type(config), None)


def prepare_config(config):
    """A copy of ``config`` with the attention the model supports (SDPA, causal without a materialised mask, where it
    can; eager where it cannot, as for Gemma2) and no KV cache."""
    config = copy.deepcopy(config)
    cls = model_class(config)
    if cls is not None:
        config._attn_implementation = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    config.use_cache = False
    return config


def meta_model(config, trust_remote_code: bool = False, split: bool = True) -> nn.Module:
    """The model of ``config`` on the meta device (shapes only), experts split (``model.moe``) unless ``split`` is
    False (the modules as a checkpoint names them).

    Raises FreelunchError for an architecture transformers has no causal LM for, or an unsupported expert layout.
    """
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise FreelunchError(
            f"unsupported architecture {getattr(config, 'model_type', '?')!r}: transformers has no causal LM for it "
            f"({str(e).splitlines()[0]})"
        ) from None
    if split:
        with torch.device("meta"):
            split_experts(lm)
    return lm


def init_non_persistent_buffers(lm: nn.Module) -> None:
    """Compute the buffers no checkpoint holds (rotary inverse frequencies) with the model's own initialiser, as
    ``from_pretrained`` does; buffers still on the meta device are first given CPU storage."""
    with torch.no_grad():
        for mod in lm.modules():
            if any(name in mod._non_persistent_buffers_set for name in mod._buffers):
                for name, buf in list(mod._buffers.items()):
                    if buf is not None and buf.is_meta:
                        mod._buffers[name] = torch.empty_like(buf, device="cpu")
                lm._init_weights(mod)


@dataclass(frozen=True)
class PositionLimit:
    """How long a sequence the model takes: ``learned`` tables end at ``positions``; rotary models were trained up to
    ``positions`` and run past it at unknown quality."""

    positions: int
    learned: bool

    def check(self, seqlen: int, option: str, warn) -> None:
        """Refuse (FreelunchError) a ``seqlen`` beyond a learned table; ``warn`` about one beyond a rotary model's
        trained context."""
        if seqlen <= self.positions:
            return
        if self.learned:
            raise FreelunchError(
                f"{option} {seqlen} is beyond the model's learned position table of {self.positions} positions; "
                f"use {option} {self.positions} or less"
            )
        warn(f"{option} {seqlen} is beyond the {self.positions} positions the model was trained on: quality is unknown")


def position_limit(lm: nn.Module, config) -> PositionLimit | None:
    """The model's position limit: a learned position embedding's size (less its offset, as OPT's), else the config's
    ``max_position_embeddings`` as a soft limit; None when the config states none."""
    table = next(
        (m for name, m in lm.named_modules() if isinstance(m, nn.Embedding) and ("position" in name or name.endswith("wpe"))),
        None,
    )
    if table is not None:
        return PositionLimit(table.num_embeddings - int(getattr(table, "offset", 0)), learned=True)
    positions = getattr(config, "max_position_embeddings", None)
    return PositionLimit(int(positions), learned=False) if positions else None

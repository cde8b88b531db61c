"""Find a causal LM's decoder blocks and their linear layers from the module structure, not the name."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from freelunch_cli.core.errors import FreelunchError


@dataclass(frozen=True)
class Arch:
    """Where a model keeps its decoder blocks."""

    model_type: str
    layers_path: str  # dotted path of the ModuleList of decoder blocks, e.g. "model.layers"
    num_blocks: int

    def block_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."


def find_arch(model: nn.Module, config) -> Arch:
    """Locate the ModuleList holding ``config.num_hidden_layers`` decoder blocks."""
    n = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n)
    ]
    candidates = [(name, mod) for name, mod in candidates if any(isinstance(m, nn.Linear) for m in mod[0].modules())]
    if not candidates:
        raise FreelunchError(
            f"unsupported architecture {getattr(config, 'model_type', '?')!r}: found no list of "
            f"{n if n is not None else 'N'} decoder blocks with linear layers (looked for e.g. model.layers or "
            f"model.decoder.layers)"
        )
    name, mod = min(candidates, key=lambda c: c[0].count("."))
    return Arch(getattr(config, "model_type", "?"), name, len(mod))


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of a decoder block (each expert's matrices included, see ``model.moe``), by relative name."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def prunable_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The matrices pruning touches: every linear layer but the gates of one output (Qwen2-MoE's shared_expert_gate),
    which, like the routers, stay dense as in llm-compressor's recipes."""
    return {name: m for name, m in block_linears(block).items() if m.out_features > 1}


@dataclass(frozen=True)
class Halves:
    """How a decoder block splits into its attention and MLP submodules, each with its norms and residual.

    ``mid_norm`` is the norm whose input is the residual stream between the two halves. Sandwich layouts (Gemma2,
    Gemma3) also normalise each submodule's output before the residual (``attn_post_norm``, ``mlp_post_norm``).
    """

    attn_norm: str
    attn: str
    mid_norm: str
    mlp: tuple[str, ...]  # modules applied in order after mid_norm (with an activation between fc1 and fc2 for OPT)
    family: str
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None

    @property
    def attention_modules(self) -> tuple[str, ...]:
        """What the attention half trains: its norms and the attention."""
        return tuple(n for n in (self.attn_norm, self.attn, self.attn_post_norm) if n)

    @property
    def mlp_modules(self) -> tuple[str, ...]:
        """What the MLP half trains: its norms and the MLP's modules."""
        return tuple(n for n in (self.mid_norm, *self.mlp, self.mlp_post_norm) if n)

    def attention(self, block: nn.Module, h, call):
        """The residual stream after the attention half: ``[b, seqlen, hidden]`` -> the same."""
        args, kwargs = call
        out = block.get_submodule(self.attn)(block.get_submodule(self.attn_norm)(h), *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return h + (block.get_submodule(self.attn_post_norm)(out) if self.attn_post_norm else out)

    def feed_forward(self, block: nn.Module, h):
        """The residual stream after the MLP half."""
        x = block.get_submodule(self.mid_norm)(h)
        if self.family == "opt":
            x = block.fc2(block.activation_fn(block.fc1(x)))
        else:
            x = block.get_submodule(self.mlp[0])(x)
        return h + (block.get_submodule(self.mlp_post_norm)(x) if self.mlp_post_norm else x)


def block_halves(block: nn.Module, model_type: str) -> Halves:
    """The attention/MLP split of a decoder block: pre-norm (Llama, Qwen2, Mistral, Phi3 and relatives; OPT) or sandwich
    (Gemma2, Gemma3: norms before and after each submodule). Raises FreelunchError for any other layout."""
    names = {n for n, _ in block.named_children()}
    sandwich = {
        "input_layernorm",
        "self_attn",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "mlp",
        "post_feedforward_layernorm",
    }
    if sandwich <= names:
        return Halves(
            "input_layernorm",
            "self_attn",
            "pre_feedforward_layernorm",
            ("mlp",),
            "sandwich",
            attn_post_norm="post_attention_layernorm",
            mlp_post_norm="post_feedforward_layernorm",
        )
    if {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"} <= names and not names & {
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    }:
        return Halves("input_layernorm", "self_attn", "post_attention_layernorm", ("mlp",), "llama")
    if {"self_attn_layer_norm", "self_attn", "final_layer_norm", "fc1", "fc2"} <= names and getattr(
        block, "do_layer_norm_before", False
    ):
        return Halves("self_attn_layer_norm", "self_attn", "final_layer_norm", ("fc1", "fc2"), "opt")
    raise FreelunchError(
        f"submodule windows need a block with attention and MLP halves of a known layout (pre-norm or sandwich norms); "
        f"{model_type!r} blocks have {sorted(names)}: use --window block"
    )


def check_halves(halves: Halves, block: nn.Module, x, call, model_type: str, tolerance: float = 1e-4) -> None:
    """Refuse (FreelunchError) a split whose two halves, composed, do not reproduce the block on real inputs ``x``."""
    import torch

    with torch.no_grad():
        out = block(x, *call[0], **call[1])
        whole = out[0] if isinstance(out, tuple) else out
        halves_out = halves.feed_forward(block, halves.attention(block, x, call))
    err = float((halves_out - whole).abs().max() / whole.abs().max().clamp_min(1e-12))
    if not err <= tolerance:
        raise FreelunchError(
            f"submodule windows: the attention and MLP halves derived for {model_type!r} blocks ({halves.family} layout) do not "
            f"reproduce the block (relative difference {err:.2g} on calibration inputs); use --window block"
        )

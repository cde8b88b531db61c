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
    """The prunable matrices of a decoder block: every nn.Linear inside it, by relative name."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@dataclass(frozen=True)
class Halves:
    """How a decoder block splits into its attention and MLP submodules (each with its norm and residual).

    ``mid_norm`` is the norm whose input is the residual stream between the two halves.
    """

    attn_norm: str
    attn: str
    mid_norm: str
    mlp: tuple[str, ...]  # modules applied in order after mid_norm (with an activation between fc1 and fc2 for OPT)
    family: str

    @property
    def attention_modules(self) -> tuple[str, ...]:
        """What the attention half trains: its norm and the attention."""
        return (self.attn_norm, self.attn)

    @property
    def mlp_modules(self) -> tuple[str, ...]:
        """What the MLP half trains: its norm and the MLP's modules."""
        return (self.mid_norm, *self.mlp)

    def attention(self, block: nn.Module, h, call):
        args, kwargs = call
        out = block.get_submodule(self.attn)(block.get_submodule(self.attn_norm)(h), *args, **kwargs)
        return h + (out[0] if isinstance(out, tuple) else out)

    def feed_forward(self, block: nn.Module, h):
        x = block.get_submodule(self.mid_norm)(h)
        if self.family == "opt":
            x = block.fc2(block.activation_fn(block.fc1(x)))
        else:
            x = block.get_submodule(self.mlp[0])(x)
        return h + x


def block_halves(block: nn.Module, model_type: str) -> Halves:
    """The attention/MLP split of a pre-norm decoder block (Llama, Qwen2, Mistral and relatives; OPT)."""
    names = {n for n, _ in block.named_children()}
    if {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"} <= names:
        return Halves("input_layernorm", "self_attn", "post_attention_layernorm", ("mlp",), "llama")
    if {"self_attn_layer_norm", "self_attn", "final_layer_norm", "fc1", "fc2"} <= names and getattr(
        block, "do_layer_norm_before", False
    ):
        return Halves("self_attn_layer_norm", "self_attn", "final_layer_norm", ("fc1", "fc2"), "opt")
    raise FreelunchError(
        f"submodule windows need a pre-norm block with attention and MLP halves; {model_type!r} blocks have {sorted(names)}"
    )

"""Find a causal LM's decoder blocks and their linear layers from the module structure, not the name."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from freelunch_cli.errors import FreelunchError


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

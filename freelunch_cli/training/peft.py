"""What a window trains: all parameters, only biases and norms, or low-rank adapters kept sparse.

``prepare(modules, masks, cfg)`` freezes everything, makes the chosen parameters trainable and returns a
``Trainable`` whose ``finalize()`` leaves plain weights behind (LoRA merged, masks re-applied), so the model
is exactly as sparse as the pruned one whichever variant ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.training.loop import MaskedParams

PEFT_VARIANTS = ("full", "bias-norm", "lora", "masked-lora")


@dataclass(frozen=True)
class PeftConfig:
    variant: str = "full"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    seed: int = 0

    def validate(self) -> None:
        if self.variant not in PEFT_VARIANTS:
            raise FreelunchError(f"unknown --peft {self.variant!r}: choose one of {', '.join(PEFT_VARIANTS)}")
        if self.lora_rank < 1:
            raise FreelunchError("--lora-rank must be at least 1")


class LoRA(nn.Module):
    """W -> W + (alpha / r) · B A, optionally multiplied by the keep-mask (MaskLoRA)."""

    def __init__(self, out_features: int, a: torch.Tensor, alpha: float, mask: torch.Tensor | None, device):
        super().__init__()
        rank = a.shape[0]
        self.A = nn.Parameter(a.to(device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.scale = alpha / rank
        self.register_buffer(
            "mask", mask.to(device=device, dtype=torch.bool) if mask is not None else None
        )  # 1 byte a weight, not 4

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.B @ self.A) * self.scale
        if self.mask is not None:
            delta = delta * self.mask
        return weight + delta.to(weight.dtype)


def qualify(prefix: str, name: str) -> str:
    """Qualified names inside a window: "3/" + "mlp.up_proj" or "3/mlp" + "." + "up_proj"."""
    return prefix + name if prefix.endswith("/") or not prefix else f"{prefix}.{name}"


def linears_of(modules: dict[str, nn.Module]) -> dict[str, nn.Linear]:
    """The linear layers of a window's trained modules, by qualified name ("3/mlp.up_proj")."""
    linears: dict[str, nn.Linear] = {}
    for prefix, m in modules.items():
        if isinstance(m, nn.Linear):
            linears[prefix] = m
        else:
            linears.update({qualify(prefix, n): sub for n, sub in m.named_modules() if isinstance(sub, nn.Linear)})
    return linears


def adapter_init(linears: dict[str, nn.Linear], cfg: PeftConfig) -> dict[str, torch.Tensor]:
    """The starting ``A`` ``[rank, in_features]`` (float32, CPU) of each linear's adapter, by qualified name, in the
    order ``prepare`` creates them: Kaiming-uniform from one generator seeded with ``cfg.seed`` (``B`` starts at zero,
    so training starts from the unadapted weights). Linears on the meta device get meta tensors, shapes only: sharded
    retraining builds its model there and fills the adapters from this once the model has storage."""
    g = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for name, lin in linears.items():
        if lin.weight.is_meta:  # a model built for its shapes (sharded retraining fills it with this function later)
            out[name] = torch.empty(cfg.lora_rank, lin.in_features, device="meta")
            continue
        a = torch.empty(cfg.lora_rank, lin.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        out[name] = a
    return out


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


@dataclass
class Trainable:
    params: MaskedParams
    linears: dict[str, nn.Linear]
    masks: dict[str, torch.Tensor]
    lora: bool

    def finalize(self) -> None:
        """Merge adapters and re-apply every mask; afterwards pruned weights are exactly zero."""
        with torch.no_grad():
            for name, lin in self.linears.items():
                if self.lora and parametrize.is_parametrized(lin, "weight"):
                    parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
                keep = self.masks.get(name)
                if keep is not None:
                    lin.weight.mul_(keep.to(lin.weight.dtype))
            for name, lin in self.linears.items():
                keep = self.masks.get(name)
                if keep is not None and bool((lin.weight[~keep] != 0).any()):
                    raise RuntimeError(f"pruned weights of {name} are not zero after reconstruction")
                if not bool(torch.isfinite(lin.weight).all()):
                    raise FreelunchError(f"training made weights of {name} NaN or infinite; lower --lr or set --grad-clip")


def prepare(modules: dict[str, nn.Module], masks: dict[str, torch.Tensor], cfg: PeftConfig) -> Trainable:
    """``modules``: the window's trainable scope by qualified name; ``masks``: keep-masks by qualified linear name."""
    cfg.validate()
    for m in modules.values():
        for p in m.parameters():
            p.requires_grad_(False)
    linears = linears_of(modules)
    params: list[nn.Parameter] = []
    by_id: dict[int, torch.Tensor] = {}
    if cfg.variant == "full":
        for m in modules.values():
            params += list(m.parameters())
        for name, lin in linears.items():
            if name in masks:
                by_id[id(lin.weight)] = masks[name]
    elif cfg.variant == "bias-norm":
        seen = set()
        for m in modules.values():
            for sub in m.modules():
                for pname, p in sub.named_parameters(recurse=False):
                    if (pname == "bias" or _is_norm(sub)) and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
    else:
        for name, a in adapter_init(linears, cfg).items():
            lin = linears[name]
            keep = masks.get(name) if cfg.variant == "masked-lora" else None
            adapter = LoRA(lin.out_features, a, cfg.lora_alpha, keep, lin.weight.device)
            parametrize.register_parametrization(lin, "weight", adapter)
            lin.parametrizations.weight.original.requires_grad_(False)
            params += [adapter.A, adapter.B]
    for p in params:
        p.requires_grad_(True)
    return Trainable(MaskedParams(params, by_id), linears, masks, cfg.variant in ("lora", "masked-lora"))

"""Quantization-aware training of a window: every linear weight runs through a straight-through fake-quantizer.

``prepare_qat(modules, masks, scheme, learn_scales)`` freezes the window, makes its linear weights trainable (pruned
entries held at exactly zero by the masked optimizer, as in reconstruction) and registers a ``FakeQuantizer`` on each,
so the window trains against the weights a serving engine will use. Scales start from round-to-nearest (min-max per
group) and are fixed, or, with ``learn_scales``, trained in log space. ``finalize()`` replaces each weight by its
dequantized value and returns the quantization parameters, so the stored model is exactly the quantized one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.quantization.schemes import QuantScheme, dequantize, minmax_qparams, quantize, ste_fake_quantize
from freelunch_cli.training.loop import MaskedParams
from freelunch_cli.training.peft import linears_of, qualify

SCALE_SUFFIX, ZERO_SUFFIX = "weight_scale", "weight_zero_point"  # compressed-tensors' names


class FakeQuantizer(nn.Module):
    """A parametrization ``W -> (clamp(round(W / s + z)) - z) · s`` with a straight-through round."""

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme, learn_scales: bool):
        super().__init__()
        self.scheme = scheme
        scale, zero = minmax_qparams(weight, scheme, torch.float32)
        self.register_buffer("zero", zero)
        self.register_buffer("base", scale)  # round-to-nearest's scale
        self.log_factor = nn.Parameter(torch.zeros_like(scale), requires_grad=learn_scales)  # exp(0) = 1 exactly

    @property
    def scale(self) -> torch.Tensor:
        return self.base * self.log_factor.exp()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return ste_fake_quantize(weight.float(), self.scale, self.zero, self.scheme).to(weight.dtype)


@dataclass
class QuantTrainable:
    params: MaskedParams
    linears: dict[str, nn.Linear]
    masks: dict[str, torch.Tensor]
    scheme: QuantScheme
    storage_dtype: torch.dtype = torch.float32

    def finalize(self) -> dict[str, torch.Tensor]:
        """Quantize every weight for good: each becomes ``(q - z) · s`` with the scale in ``storage_dtype`` (exactly the
        value compressed-tensors dequantizes to); returns ``{name.weight_scale, name.weight_zero_point}`` by qualified
        linear name. Raises FreelunchError for non-finite weights, RuntimeError if a pruned weight is not zero."""
        qparams = {}
        with torch.no_grad():
            for name, lin in self.linears.items():
                scale = lin.parametrizations.weight[0].scale.detach()
                zero = lin.parametrizations.weight[0].zero
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
                w = lin.weight.float()
                keep = self.masks.get(name)
                if keep is not None:
                    w = w * keep
                if not bool(torch.isfinite(w).all()):
                    raise FreelunchError(f"training made weights of {name} NaN or infinite; lower --lr")
                scale = scale.to(self.storage_dtype)
                deq = dequantize(quantize(w, scale, zero, self.scheme), scale, zero, self.scheme)
                if keep is not None and bool((deq[~keep] != 0).any()):
                    raise RuntimeError(f"pruned weights of {name} are not zero after quantization")
                lin.weight.copy_(deq.to(lin.weight.dtype))
                qparams[f"{name}.{SCALE_SUFFIX}"] = scale.contiguous()
                qparams[f"{name}.{ZERO_SUFFIX}"] = zero.contiguous()
        return qparams


def prepare_qat(
    modules: dict[str, nn.Module],
    masks: dict[str, torch.Tensor],
    scheme: QuantScheme,
    learn_scales: bool = False,
    storage_dtype: torch.dtype = torch.float32,
    scale_lr_factor: float = 1.0,
) -> QuantTrainable:
    """``modules``: the window's trained scope by qualified name; ``masks``: keep-masks (bool ``[out, in]``) by
    qualified linear name; ``storage_dtype``: the dtype of the stored weights and scales; ``scale_lr_factor``: the
    learned scales' learning rate as a multiple of the weights'. Raises FreelunchError for a matrix that does not split
    into whole groups, or for weights that are not linear layers (mixture-of-experts tensors)."""
    for m in modules.values():
        for p in m.parameters():
            p.requires_grad_(False)
    for prefix, m in modules.items():  # by qualified name: a matrix window's own parameter is "3/mlp.up_proj.weight"
        scheme.check_block({qualify(prefix, n): p for n, p in m.named_parameters()})
    linears = linears_of(modules)
    weights = {id(lin.weight) for lin in linears.values()}
    params: list[nn.Parameter] = []  # biases and norms train as they are, as in full reconstruction
    seen: set[int] = set()
    for m in modules.values():
        for p in m.parameters():
            if id(p) not in weights and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    by_id: dict[int, torch.Tensor] = {}
    factors: dict[int, float] = {}
    for name, lin in linears.items():  # shapes were checked above, with the block's other tensors
        keep = masks.get(name)
        if keep is not None:
            with torch.no_grad():
                lin.weight.mul_(keep.to(lin.weight.dtype))
        parametrize.register_parametrization(lin, "weight", FakeQuantizer(lin.weight.detach(), scheme, learn_scales))
        weight = lin.parametrizations.weight.original
        params.append(weight)
        if keep is not None:
            by_id[id(weight)] = keep
        quantizer = lin.parametrizations.weight[0]
        if learn_scales:
            params.append(quantizer.log_factor)
            factors[id(quantizer.log_factor)] = scale_lr_factor
    for p in params:
        p.requires_grad_(True)
    return QuantTrainable(MaskedParams(params, by_id, factors), linears, masks, scheme, storage_dtype)

"""Integer weight-only quantization schemes (W4A16, W8A16) in groups along the input dimension.

The arithmetic is compressed-tensors' (the format vLLM and transformers load), so a weight quantized here and packed
by that library dequantizes to the same bits:

- range: ``[-2^(b-1), 2^(b-1) - 1]`` for symmetric and asymmetric schemes alike;
- scales from the group's min and max, the range widened to hold 0: symmetric ``max|w| / ((qmax - qmin) / 2)``,
  asymmetric ``(max - min) / (qmax - qmin)`` with an integer zero point ``round(clamp(qmin - min / s))``;
- ``q = round(clamp(w / s + z, qmin, qmax))`` (round half to even), ``w_hat = (q - z) · s`` in the scale's dtype.

Zero is exactly representable in every scheme: ``0 / s + z = z`` is an integer inside the range, so a pruned weight
quantizes to ``z`` and dequantizes to exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from freelunch_cli.core.errors import FreelunchError

SCHEMES = {"w4a16": 4, "w8a16": 8}  # weight bits; activations stay in 16 bits


@dataclass(frozen=True)
class QuantScheme:
    """``num_bits``-bit integer weights, one scale (and zero point) per ``group_size`` consecutive inputs of a row."""

    num_bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    @property
    def name(self) -> str:
        return f"w{self.num_bits}a16"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1

    def describe(self) -> str:
        return f"{self.name}, groups of {self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}"

    def check_shape(self, name: str, weight: torch.Tensor) -> None:
        """Raise FreelunchError unless ``weight`` ``[out, in]`` splits into whole groups."""
        cols = weight.shape[-1]
        if weight.dim() != 2 or cols % self.group_size:
            divisors = [g for g in (256, 128, 64, 32, 16) if cols % g == 0]
            hint = f"; pass --group-size {divisors[0]}" if divisors else ""
            raise FreelunchError(
                f"{name} has {cols} inputs, not a multiple of --group-size {self.group_size}{hint} (a divisor of every matrix's inputs)"
            )

    def check_block(self, state: dict[str, torch.Tensor], where: str = "") -> None:
        """Raise FreelunchError unless every matrix of a block's tensors (2-D ``.weight``; meta tensors will do) splits
        into whole groups and the block holds no 3-D expert weights (not supported yet). ``where`` ("block 3: ")
        prefixes the tensor the error names."""
        for key, value in state.items():
            if value.dim() > 2:
                raise FreelunchError(
                    f"quantize does not support mixture-of-experts weights yet ({where}{key} is {value.dim()}-D "
                    f"{tuple(value.shape)}); quantize a dense-MLP model"
                )
            if value.dim() == 2 and key.endswith(".weight"):
                self.check_shape(where + key[: -len(".weight")], value)


def parse_scheme(name: str, group_size: int, symmetric: bool) -> QuantScheme:
    """The scheme ``--scheme NAME --group-size G``; FreelunchError for an unknown name or a bad group size."""
    bits = SCHEMES.get(name.strip().lower())
    if bits is None:
        raise FreelunchError(f"unknown --scheme {name!r}: choose one of {', '.join(SCHEMES)}")
    if group_size < 2:
        raise FreelunchError(f"--group-size must be at least 2, got {group_size}")
    return QuantScheme(bits, group_size, symmetric)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, in / group_size, group_size]``."""
    return w.unflatten(-1, (w.shape[-1] // group_size, group_size))


def minmax_qparams(w: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest parameters of ``w`` ``[out, in]``: scale ``[out, in / g]`` in ``dtype`` (default ``w``'s) and
    integer zero point ``[out, in / g]`` (int8; zeros for a symmetric scheme). A scale of 0 (a group of zeros, e.g. fully
    pruned) becomes the dtype's eps, as compressed-tensors does, so that nothing divides by zero."""
    dtype = dtype or w.dtype
    g = _grouped(w.detach().float(), scheme.group_size)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    span = scheme.qmax - scheme.qmin
    if scheme.symmetric:
        scale = torch.maximum(lo.abs(), hi) / (span / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / span
        zero = (scheme.qmin - lo / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(scheme.qmin, scheme.qmax)
    scale = scale.to(dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype, device=scale.device), scale)
    return scale, torch.round(zero).to(torch.int8)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Integer codes (int8) ``[out, in]`` of ``w`` (computed in float32 or wider: ``w`` is promoted with ``scale``)."""
    x = _grouped(w, scheme.group_size)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    scaled = x / scale.unsqueeze(-1)
    scaled = scaled + zero.unsqueeze(-1).to(scaled.dtype)
    return torch.round(torch.clamp(scaled, scheme.qmin, scheme.qmax)).flatten(-2).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``(codes - zero) · scale`` ``[out, in]`` in the scale's dtype: the weights a serving engine computes with."""
    q = _grouped(codes, scheme.group_size).to(scale.dtype) - zero.unsqueeze(-1).to(scale.dtype)
    return (q * scale.unsqueeze(-1)).flatten(-2)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``dequantize(quantize(w))``, in the scale's dtype."""
    return dequantize(quantize(w, scale, zero, scheme), scale, zero, scheme)


def ste_fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Differentiable fake quantization for training (float32): rounding passes gradients straight through (STE, Bengio
    et al. 2013), clamping stops them outside the range, and the scale gets the LSQ gradient (Esser et al., ICLR 2020).
    Forward values equal ``fake_quantize`` in float32."""
    x = _grouped(w, scheme.group_size) / scale.unsqueeze(-1) + zero.unsqueeze(-1).to(w.dtype)
    x = torch.clamp(x, scheme.qmin, scheme.qmax)
    q = x + (torch.round(x) - x).detach()
    return ((q - zero.unsqueeze(-1).to(w.dtype)) * scale.unsqueeze(-1)).flatten(-2)

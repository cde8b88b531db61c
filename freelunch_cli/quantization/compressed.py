"""Packing quantized weights as a compressed-tensors checkpoint ("pack-quantized": eight 4-bit or four 8-bit codes per
int32), the format vLLM and transformers load. The packing and the config are the compressed-tensors library's own;
this module only hands it our weights, scales and zero points, and checks that its dequantization gives our weights
back bit for bit.
"""

from __future__ import annotations

import torch

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.quantization.fake_quant import SCALE_SUFFIX, ZERO_SUFFIX
from freelunch_cli.quantization.schemes import QuantScheme, _grouped, dequantize, quantize


def _library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise FreelunchError(
            "--format compressed-tensors needs the compressed-tensors package: pip install compressed-tensors"
        ) from None
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    return PackedQuantizationCompressor, QuantizationArgs, QuantizationConfig, QuantizationScheme


def ct_scheme(scheme: QuantScheme, targets: list[str] | None = None):
    """The compressed-tensors ``QuantizationScheme`` of ``scheme`` (integer weights in groups, no activation quantization)."""
    _, args_cls, _, scheme_cls = _library()
    args = args_cls(
        num_bits=scheme.num_bits, type="int", symmetric=scheme.symmetric, strategy="group", group_size=scheme.group_size
    )
    return scheme_cls(targets=targets or ["Linear"], weights=args)


def ct_config(scheme: QuantScheme, ignore: list[str]):
    """The checkpoint's ``quantization_config`` (a compressed-tensors ``QuantizationConfig``, status compressed)."""
    _, _, config_cls, _ = _library()
    return config_cls(
        config_groups={"group_0": ct_scheme(scheme)},
        ignore=ignore,
        format="pack-quantized",
        quantization_status="compressed",
    )


def stored_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The integer codes (int8 ``[out, in]``) that dequantize to ``weight`` (``[out, in]``, the stored dequantized
    weight) exactly. Dividing by the scale finds them only up to one step when the storage dtype rounded
    ``(q - z) · s`` (bfloat16's 8-bit mantissa, codes up to 255 from the zero point with 8 bits), so each code is the
    one among the nearest three whose dequantization is the stored weight; where neighbouring codes round to the same
    weight, either gives it. Raises FreelunchError where none does (the weight is not a quantized one)."""
    first = quantize(weight.float(), scale, zero, scheme)
    codes, found = first.clone(), torch.zeros_like(first, dtype=torch.bool)
    for step in (0, -1, 1):
        q = (first.int() + step).clamp(scheme.qmin, scheme.qmax).to(torch.int8)
        hit = (dequantize(q, scale, zero, scheme).to(weight.dtype) == weight) & ~found
        codes[hit] = q[hit]
        found |= hit
    if not bool(found.all()):
        raise FreelunchError("not a quantized weight")
    return codes


def pack_block(state: dict[str, torch.Tensor], qparams: dict[str, torch.Tensor], scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """A block's tensors with every quantized weight (one with ``name.weight_scale`` in ``qparams``) replaced by
    compressed-tensors' ``weight_packed`` (int32), ``weight_scale``, ``weight_shape`` (and ``weight_zero_point`` for an
    asymmetric scheme). Raises FreelunchError if unpacking would not give the stored weight back bit for bit."""
    packer, *_ = _library()
    cts = ct_scheme(scheme)
    out = dict(state)
    for key in [k for k in qparams if k.endswith("." + SCALE_SUFFIX)]:
        module = key[: -len(SCALE_SUFFIX) - 1]
        weight = out.pop(f"{module}.weight")
        scale, zero = qparams[key], qparams[f"{module}.{ZERO_SUFFIX}"]
        try:
            codes = stored_codes(weight, scale, zero, scheme)
        except FreelunchError:
            raise FreelunchError(
                f"{module}: the stored weight is not one its scales and zero points give; the quantized model is damaged, "
                "rerun `freelunch quantize --force`"
            ) from None
        local = {  # (q - z) · s in float32 divides back to q exactly, whatever the storage dtype rounded
            "weight": (_grouped(codes, scheme.group_size).float() - zero.float().unsqueeze(-1))
            .mul(scale.float().unsqueeze(-1))
            .flatten(-2),
            SCALE_SUFFIX: scale,
            ZERO_SUFFIX: zero,
        }
        packed = packer.compress(local, cts)
        back = packer.decompress(packed, cts)["weight"]
        if back.dtype != weight.dtype or not torch.equal(back, weight):
            raise FreelunchError(
                f"{module}: the packed weight does not unpack to the stored one; the quantized model is damaged, rerun "
                "`freelunch quantize --force`"
            )
        out.update({f"{module}.{k}": v for k, v in packed.items()})
    return out

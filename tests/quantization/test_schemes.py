"""Quantization arithmetic on plain tensors, against compressed-tensors' own (an independent implementation)."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.quantization.fake_quant import FakeQuantizer, prepare_qat
from freelunch_cli.quantization.schemes import (
    QuantScheme,
    dequantize,
    fake_quantize,
    minmax_qparams,
    parse_scheme,
    quantize,
    ste_fake_quantize,
)

SCHEMES = [QuantScheme(bits, 32, sym) for bits in (4, 8) for sym in (True, False)]


def _sparse_weight(dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 128, generator=g) * 0.05
    w[w.abs() < 0.04] = 0  # about 60% pruned
    w[5, :32] = 0  # a whole group pruned: its scale is 0 before the eps
    w[7, 32:64] = w[7, 32:64].abs()  # a group with no negative weight
    return w.to(dtype)


def _ct_args(s: QuantScheme) -> QuantizationArgs:
    return QuantizationArgs(num_bits=s.num_bits, type="int", symmetric=s.symmetric, strategy="group", group_size=s.group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.num_bits}bit-{'sym' if s.symmetric else 'asym'}")
def test_quantization_matches_compressed_tensors_bit_for_bit(scheme, dtype):
    w = _sparse_weight(dtype)
    scale, zero = minmax_qparams(w, scheme, dtype)
    g = w.float().unflatten(-1, (-1, scheme.group_size))  # scales computed in float32, then stored in the dtype
    ct_scale, ct_zero = calculate_qparams(g.amin(-1), g.amax(-1), _ct_args(scheme))
    live = g.abs().amax(-1) > 0  # a group of zeros gets the dtype's eps; any zero point gives zeros there
    assert torch.equal(scale[live], ct_scale.to(dtype)[live])  # the same min-max rule
    assert bool((scale[~live] == torch.finfo(dtype).eps).all())
    assert torch.equal(zero.long()[live], ct_zero.round().long()[live])
    ours = fake_quantize(w, scale, zero, scheme)
    theirs = ct_fake_quantize(w.float(), scale, zero, _ct_args(scheme)).to(dtype)
    assert ours.dtype == dtype and torch.equal(ours, theirs)
    codes = quantize(w, scale, zero, scheme)
    assert codes.dtype == torch.int8 and int(codes.min()) >= scheme.qmin and int(codes.max()) <= scheme.qmax
    assert len(torch.unique(codes[0, :32])) <= 2**scheme.num_bits


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.num_bits}bit-{'sym' if s.symmetric else 'asym'}")
def test_zero_quantizes_and_dequantizes_to_exactly_zero(scheme):
    w = _sparse_weight()
    scale, zero = minmax_qparams(w, scheme)
    codes = quantize(w, scale, zero, scheme)
    back = dequantize(codes, scale, zero, scheme)
    assert bool((back[w == 0] == 0).all())
    assert torch.equal(codes[w == 0].long(), zero.repeat_interleave(scheme.group_size, dim=1)[w == 0].long())
    # any scale, even one training moved, keeps zero exact: 0 / s + z = z, an integer inside the range
    for factor in (0.3, 1.0, 7.0):
        back = fake_quantize(w, scale * factor, zero, scheme)
        assert bool((back[w == 0] == 0).all())
        assert bool((ste_fake_quantize(w, scale * factor, zero, scheme)[w == 0] == 0).all())


def test_straight_through_gradients():
    s = QuantScheme(4, 32, True)
    w = _sparse_weight().requires_grad_(True)
    scale, zero = minmax_qparams(w, s)
    scale = (scale * 0.5).requires_grad_(True)  # clipped: the largest weights fall outside the range
    y = ste_fake_quantize(w, scale, zero, s)
    assert torch.equal(y.detach(), fake_quantize(w.detach(), scale.detach(), zero, s))
    y.sum().backward()
    x = w.detach() / scale.detach().repeat_interleave(32, dim=1)
    inside = (x >= s.qmin) & (x <= s.qmax)
    assert not bool(inside.all())
    assert torch.equal(w.grad, inside.float())  # round passes gradients straight through, the clamp stops them
    assert scale.grad is not None and bool(scale.grad.abs().sum() > 0)  # LSQ: scales get a gradient


def test_qat_keeps_pruned_weights_zero_and_ends_on_the_grid():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    keep = torch.rand(32, 64) > 0.5
    s = QuantScheme(4, 32, False)
    t = prepare_qat({"0/": torch.nn.Sequential(lin)}, {"0/0": keep}, s, learn_scales=True, scale_lr_factor=10.0)
    assert isinstance(lin.parametrizations.weight[0], FakeQuantizer)
    groups = t.params.groups(1e-3)  # scales train at their own rate
    assert sorted(g["lr"] for g in groups) == [1e-3, 1e-2] and sum(len(g["params"]) for g in groups) == 3
    opt = torch.optim.AdamW(groups, lr=1e-3)
    x, target = torch.randn(16, 64), torch.randn(16, 32)
    for _ in range(5):
        loss = torch.mean((lin(x) - target) ** 2)
        opt.zero_grad()
        loss.backward()
        t.params.mask_grads()
        opt.step()
        t.params.apply()
    qparams = t.finalize()
    scale, zero = qparams["0/0.weight_scale"], qparams["0/0.weight_zero_point"]
    assert bool((lin.weight[~keep] == 0).all())
    assert torch.equal(lin.weight.detach(), fake_quantize(lin.weight.detach(), scale, zero, s))  # on the grid already
    assert not torch.allclose(scale, minmax_qparams(lin.weight.detach(), s)[0])  # the learned scales were kept


def test_bad_schemes_and_shapes_are_refused():
    with pytest.raises(FreelunchError, match="unknown --scheme 'w3a16'"):
        parse_scheme("w3a16", 128, True)
    with pytest.raises(FreelunchError, match="--group-size must be at least 2"):
        parse_scheme("w4a16", 1, True)
    with pytest.raises(
        FreelunchError, match=r"mlp.up_proj has 576 inputs, not a multiple of --group-size 128; pass --group-size 64"
    ):
        QuantScheme(4, 128, True).check_shape("mlp.up_proj", torch.zeros(8, 576))


def test_packing_keeps_the_codes_of_bfloat16_weights_that_division_misses():
    """w8a16 asymmetric stored in bfloat16: (q - z) · s rounded to bfloat16's 8-bit mantissa, divided by s, lands on
    a neighbouring code for some of the 256; the packed weight must still unpack to the stored one bit for bit."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    from freelunch_cli.quantization.compressed import ct_scheme, pack_block
    from freelunch_cli.quantization.schemes import QuantScheme, dequantize, minmax_qparams, quantize

    scheme = QuantScheme(8, 16, symmetric=False)
    torch.manual_seed(0)
    w = torch.rand(64, 128) * 0.1  # all positive: the zero point at -128, codes up to 255 steps from it
    scale, zero = minmax_qparams(w, scheme, torch.bfloat16)
    codes = quantize(w, scale, zero, scheme)
    stored = dequantize(codes, scale, zero, scheme)  # bfloat16, as quantize stores it
    assert stored.dtype == torch.bfloat16
    naive = dequantize(quantize(stored.float(), scale, zero, scheme), scale, zero, scheme)
    assert not torch.equal(naive, stored)  # the case: dividing the stored weight finds other codes
    packed = pack_block(
        {"mlp.up_proj.weight": stored}, {"mlp.up_proj.weight_scale": scale, "mlp.up_proj.weight_zero_point": zero}, scheme
    )
    local = {k.removeprefix("mlp.up_proj."): v for k, v in packed.items()}
    back = PackedQuantizationCompressor.decompress(local, ct_scheme(scheme))["weight"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, stored)

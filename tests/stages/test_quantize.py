"""The quantize stage and the compressed-tensors export: quantization-aware local reconstruction on tiny models,
checked against compressed-tensors' own arithmetic and against transformers loading the exported checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from freelunch_cli.configs.stage_configs import QuantizeConfig
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.evaluation.compare import compare
from freelunch_cli.stages.evaluate import EvalConfig, evaluate
from freelunch_cli.stages.export import ExportConfig, export
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.quantize import quantize
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct
from freelunch_cli.workdir.files import load_tensors, read_json

from helpers import HELDOUT, streamed_logits


def _pruned(fresh_work, arch="llama"):
    work = fresh_work(arch)
    prune(work, PruneConfig(criterion="wanda", sparsity=0.5, device="cpu"))
    return work


def _matrices(state: dict) -> list[str]:
    return [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_to_nearest_equals_compressed_tensors_min_max(arch, symmetric, fresh_work):
    work = _pruned(fresh_work, arch)
    summary = quantize(work, QuantizeConfig(group_size=32, symmetric=symmetric, steps=0, device="cpu"))
    assert summary["loss_before"] == summary["loss_after"]  # nothing trained
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=32)
    for i in range(2):
        pruned, quant = load_tensors(work.block_path("pruned", i)), load_tensors(work.block_path("quantized", i))
        qparams = load_tensors(work.qparams_path(i))
        masks = load_tensors(work.mask_path(i))
        for name in _matrices(pruned):
            w = pruned[f"{name}.weight"]
            g = w.unflatten(-1, (-1, 32))
            scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)  # the independent computation
            live = g.abs().amax(-1) > 0
            assert torch.equal(qparams[f"{name}.weight_scale"][live], scale[live])
            expected = ct_fake_quantize(w, qparams[f"{name}.weight_scale"], qparams[f"{name}.weight_zero_point"], args)
            assert torch.equal(quant[f"{name}.weight"], expected), name
            if name in masks:
                assert bool((quant[f"{name}.weight"][~masks[name]] == 0).all())
        for k in pruned:  # norms and biases untouched
            if not any(k == f"{n}.weight" for n in _matrices(pruned)):
                assert torch.equal(quant[k], pruned[k]), k


def test_quantization_aware_reconstruction_beats_round_to_nearest_and_keeps_the_zeros(fresh_work):
    work = _pruned(fresh_work)
    rtn = quantize(work, QuantizeConfig(group_size=32, steps=0, device="cpu"))
    # the tiny model's matrices have an RMS of 0.02, where the default relative rate (5e-3 x RMS) is 1e-4: 1e-3 here
    qar = quantize(work, QuantizeConfig(group_size=32, device="cpu", learn_scales=True, lr=1e-3), force=True)
    assert qar["loss_before"] == pytest.approx(rtn["loss_after"])  # training starts from round-to-nearest
    assert qar["loss_after"] < 0.8 * qar["loss_before"]
    assert QuantizeConfig().resolved("pruned").rate() == (5e-3, True)  # from the pruned model: reconstruct's rate
    for i in range(2):
        quant, qparams, masks = (
            load_tensors(work.block_path("quantized", i)),
            load_tensors(work.qparams_path(i)),
            load_tensors(work.mask_path(i)),
        )
        for name, keep in masks.items():
            w = quant[f"{name}.weight"]
            assert bool((w[~keep] == 0).all()), name
            codes = torch.round(w.unflatten(-1, (-1, 32)) / qparams[f"{name}.weight_scale"].unsqueeze(-1))
            assert bool((codes >= -8).all() and (codes <= 7).all())  # on the 4-bit grid of the stored scales
            assert torch.equal(codes * qparams[f"{name}.weight_scale"].unsqueeze(-1), w.unflatten(-1, (-1, 32)))


def test_quantize_from_each_model_and_latest(fresh_work):
    work = fresh_work("llama")
    quantize(work, QuantizeConfig(group_size=32, steps=2, device="cpu"))  # latest = dense: no masks
    assert work.stage("quantize").signature["from"] == "dense" and work.stage("quantize").summary["config"]["lr_relative"] == 5e-4
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))  # the dense model's quantization stays
    assert work.stage("quantize").status == "done" and work.stage("quantize").signature["from"] == "dense"
    reconstruct(work, ReconstructConfig(steps=2, device="cpu"))
    with pytest.raises(FreelunchError, match="another quantize configuration .*from: 'dense' then, 'reconstructed' now"):
        quantize(work, QuantizeConfig(group_size=32, steps=2, device="cpu"))  # latest is now the reconstruction
    quantize(work, QuantizeConfig(group_size=32, steps=2, device="cpu"), force=True)
    assert work.stage("quantize").signature["from"] == "reconstructed"
    ids = load_tensors(work.tokens_path)["input_ids"][:2]
    # the quantized model reads as any model: eval's latest is it, and its rest is the reconstructed model's
    assert evaluate(work, EvalConfig(ppl=[str(HELDOUT)], limit_sequences=2, device="cpu"))["results"][0]["model"] == "quantized"
    assert not torch.equal(streamed_logits(work, "quantized", ids), streamed_logits(work, "reconstructed", ids))
    rows = [r for r in compare([work.root])["rows"] if r["model"] == "quantized"]
    assert len(rows) == 1 and "w4a16 g32" in rows[0]["what"] and "reconstruction" in rows[0]["what"]


def test_bad_options_are_refused_with_one_line(fresh_work):
    work = _pruned(fresh_work)
    with pytest.raises(FreelunchError, match=r"has 64 inputs, not a multiple of --group-size 128; pass --group-size 64"):
        quantize(work, QuantizeConfig(device="cpu"))
    with pytest.raises(FreelunchError, match="unknown --scheme 'int4'"):
        quantize(work, QuantizeConfig(scheme="int4", device="cpu"))
    with pytest.raises(FreelunchError, match="--from must be one of"):
        quantize(work, QuantizeConfig(start="quantized", device="cpu"))
    with pytest.raises(FreelunchError, match="no finished reconstructed model"):
        quantize(work, QuantizeConfig(start="reconstructed", group_size=32, device="cpu"))
    with pytest.raises(FreelunchError, match="--format compressed-tensors packs a quantized model, but the pruned model"):
        export(work, ExportConfig(out=str(work.root / "x"), format="compressed-tensors"))


@pytest.mark.parametrize("symmetric,bits", [(True, "w4a16"), (False, "w8a16")])
def test_compressed_tensors_export_loads_in_transformers_bit_for_bit(symmetric, bits, fresh_work, tmp_path):
    work = _pruned(fresh_work)
    quantize(work, QuantizeConfig(scheme=bits, group_size=32, symmetric=symmetric, steps=4, device="cpu"))
    out = tmp_path / "ct"
    summary = export(work, ExportConfig(out=str(out), format="compressed-tensors", max_shard_size="40KB"))
    assert summary["shards"] > 1 and summary["block_sparsity"] == pytest.approx(0.5, abs=0.01)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32 and qc["ignore"] == ["lm_head"]
    card = (out / "README.md").read_text()
    assert (
        f"{bits}, groups of 32, {'symmetric' if symmetric else 'asymmetric'}" in card
        and "sparsity of block linear weights 0.5" in card
    )
    dense = export(work, ExportConfig(out=str(tmp_path / "hf"), stage="dense"))
    assert summary["bytes"] < dense["bytes"]
    stored = {}
    for f in out.glob("*.safetensors"):
        stored.update(load_tensors(f))
    packed = {k: v for k, v in stored.items() if k.endswith("weight_packed")}
    assert len(packed) == 2 * 7 and all(v.dtype == torch.int32 for v in packed.values())
    bits_per_weight = 4 if bits == "w4a16" else 8
    linear_numel = sum(stored[k.replace("weight_packed", "weight_shape")].prod().item() for k in packed)
    assert sum(v.numel() * 4 for v in packed.values()) * 8 == linear_numel * bits_per_weight  # no padding, no waste
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    for i, layer in enumerate(model.model.layers):
        quant = load_tensors(work.block_path("quantized", i))
        for name in _matrices(quant):
            assert torch.equal(layer.get_submodule(name).weight, quant[f"{name}.weight"]), (i, name)  # bit for bit
    ids = load_tensors(work.tokens_path)["input_ids"][:2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, streamed_logits(work, "quantized", ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(FreelunchError, match="--dtype cannot be combined with --format compressed-tensors"):
        export(work, ExportConfig(out=str(tmp_path / "x"), format="compressed-tensors", dtype="bfloat16"))
    # `eval --model` reads the packed checkpoint too, and measures what the work directory's model measures
    by_path = evaluate(None, EvalConfig(ppl=[str(HELDOUT)], model=str(out), limit_sequences=2, device="cpu"))
    by_work = evaluate(work, EvalConfig(ppl=[str(HELDOUT)], stage="quantized", limit_sequences=2, device="cpu"))
    assert by_path["results"][0]["ppl"] == pytest.approx(by_work["results"][0]["ppl"], rel=1e-5)


def test_quantize_killed_mid_way_resumes_to_the_same_model(fresh_work):
    work, ref = _pruned(fresh_work), _pruned(fresh_work)
    quantize(ref, QuantizeConfig(group_size=32, steps=3, device="cpu"))
    args = [sys.executable, "-m", "freelunch_cli", "quantize", "--work", str(work.root), "--group-size", "32", "--steps", "3"]
    args += ["--device", "cpu", "--quiet"]
    killed = subprocess.run(args, env={**os.environ, "FREELUNCH_KILL_AT": "quantize.window:1"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert read_json(work.window_record_path(0, "quantize"))["status"] == "done"
    assert not work.window_record_path(1, "quantize").exists()
    refused = subprocess.run(args, capture_output=True, text=True)
    assert refused.returncode != 0 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for i in range(2):
        for path in (work.block_path("quantized", i), work.qparams_path(i)):
            a, b = load_tensors(path), load_tensors(ref.root / path.relative_to(work.root))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path


def test_two_sharded_workers_give_the_single_process_model(fresh_work):
    work, ref = _pruned(fresh_work), _pruned(fresh_work)
    quantize(ref, QuantizeConfig(group_size=32, steps=3, device="cpu"))
    args = [sys.executable, "-m", "freelunch_cli", "quantize", "--work", str(work.root), "--group-size", "32", "--steps", "3"]
    workers = [subprocess.Popen([*args, "--shard", f"{k}/2", "--device", "cpu", "--quiet"]) for k in range(2)]
    assert [w.wait() for w in workers] == [0, 0]
    assert work.stage("quantize").status == "done"
    for i in range(2):
        a, b = load_tensors(work.block_path("quantized", i)), load_tensors(ref.block_path("quantized", i))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("window", ["submodule", "matrix"])
def test_chained_inputs_and_smaller_windows(window, fresh_work):
    work = _pruned(fresh_work)
    s = quantize(work, QuantizeConfig(group_size=32, steps=2, inputs="sparse", window=window, device="cpu"))
    assert s["windows"] == (4 if window == "submodule" else 14) and s["loss_after"] < s["loss_before"]
    assert not (work.acts_dir / "quant").exists()  # the chained stream is deleted once the stage is done
    for i in range(2):
        quant, masks = load_tensors(work.block_path("quantized", i)), load_tensors(work.mask_path(i))
        assert all(bool((quant[f"{n}.weight"][~keep] == 0).all()) for n, keep in masks.items())
        assert set(load_tensors(work.qparams_path(i))) == {
            f"{n}.{k}" for n in masks for k in ("weight_scale", "weight_zero_point")
        }


def test_mixture_of_experts_is_refused_before_anything_is_written(fresh_work):
    work = fresh_work("mixtral")
    with pytest.raises(FreelunchError, match=r"does not support mixture-of-experts weights yet \(block 0: mlp\.experts\."):
        quantize(work, QuantizeConfig(group_size=32, steps=0, device="cpu"))
    assert work.stage("quantize") is None


def test_experts_after_a_dense_first_block_are_refused_before_anything_is_written(tmp_path):
    """Qwen2-MoE's mlp_only_layers (DeepSeek-V3's first_k_dense_replace): block 0 dense, block 1 experts. Checking
    block 0 only accepted the model, and export then stopped half-written on block 1."""
    from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
    from freelunch_cli.workdir.directory import WorkDir

    from helpers import CALIB, make_tiny_model

    model = make_tiny_model(tmp_path / "m", "qwen2_moe", mlp_only_layers=[0])
    work = WorkDir(tmp_path / "w")
    calibrate(work, CalibrateConfig(model=str(model), data=str(CALIB), samples=4, seqlen=32, device="cpu"))
    assert "mlp.gate_proj.weight" in load_tensors(work.block_path("dense", 0))  # the layout the test is about
    with pytest.raises(FreelunchError, match=r"\(block 1: mlp\.experts\.\w+ is 3-D \(4, "):
        quantize(work, QuantizeConfig(group_size=16, steps=0, device="cpu"))
    assert work.stage("quantize") is None and not work.model_dir("quantized").exists()


def _calibrated(tmp_path, arch="llama", storage_dtype="auto", **overrides):
    from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
    from freelunch_cli.workdir.directory import WorkDir

    from helpers import CALIB, make_tiny_model

    model = make_tiny_model(tmp_path / "m", arch, **overrides)
    work = WorkDir(tmp_path / "w")
    cfg = CalibrateConfig(model=str(model), data=str(CALIB), samples=4, seqlen=32, storage_dtype=storage_dtype, device="cpu")
    calibrate(work, cfg)
    return work


def test_the_export_ignores_every_linear_it_stores_as_float_and_loads_plainly(tmp_path):
    """OPT-350m's project_in/project_out are linear layers outside the blocks: an ignore list of lm_head alone made
    transformers fill their packed weights at random (NaN); `eval --model` must refuse such a folder as they do."""
    work = _calibrated(tmp_path, "opt", word_embed_proj_dim=32, do_layer_norm_before=False)
    quantize(work, QuantizeConfig(group_size=16, steps=0, device="cpu"))
    out = tmp_path / "ct"
    export(work, ExportConfig(out=str(out), format="compressed-tensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head", "model.decoder.project_in", "model.decoder.project_out"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # the documented way: no dequantize=True
    ids = load_tensors(work.tokens_path)["input_ids"][:2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, streamed_logits(work, "quantized", ids), atol=1e-4, rtol=1e-4)
    config["quantization_config"]["ignore"] = ["lm_head"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        FreelunchError,
        match=r"model\.decoder\.project_(in|out) is quantized by its quantization_config .* stored as a float weight",
    ):
        evaluate(None, EvalConfig(ppl=[str(HELDOUT)], model=str(out), limit_sequences=2, device="cpu"))


def test_w8a16_asymmetric_on_bfloat16_weights_exports_its_codes_bit_for_bit(tmp_path):
    """Dividing bfloat16-rounded weights by their scales lands some of the 256 codes on a neighbour: the export must
    pack the codes whose dequantization is the stored weight, not refuse the model as damaged."""
    work = _calibrated(tmp_path, storage_dtype="bfloat16")
    prune(work, PruneConfig(criterion="wanda", sparsity=0.5, device="cpu"))
    quantize(work, QuantizeConfig(scheme="w8a16", symmetric=False, group_size=16, steps=0, device="cpu"))
    out = tmp_path / "ct"
    export(work, ExportConfig(out=str(out), format="compressed-tensors"))
    assert "CompressedTensorsConfig(dequantize=True)" in (out / "README.md").read_text()  # how asymmetric loads
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    for i, layer in enumerate(model.model.layers):
        quant = load_tensors(work.block_path("quantized", i))
        for name in _matrices(quant):
            got = layer.get_submodule(name).weight
            assert got.dtype == torch.bfloat16 and torch.equal(got, quant[f"{name}.weight"]), (i, name)

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.stages.evaluate import EvalConfig, evaluate
from freelunch_cli.stages.export import ExportConfig, export
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct
from freelunch_cli.workdir.files import load_tensors

from helpers import HELDOUT, SEQLEN, streamed_logits


@pytest.mark.parametrize("arch,shard", [("llama", "2GB"), ("qwen2", "40KB"), ("opt", "60KB")])
def test_export_loads_in_transformers_with_the_same_zeros_and_outputs(arch, shard, fresh_work, tmp_path):
    work = fresh_work(arch)
    prune(work, PruneConfig(criterion="wanda", sparsity=0.5, device="cpu"))
    reconstruct(work, ReconstructConfig(lr=1e-3, device="cpu"))
    out = tmp_path / "hf"
    summary = export(work, ExportConfig(out=str(out), max_shard_size=shard))
    assert (out / "README.md").read_text().count("wanda") == 1
    if shard != "2GB":
        assert summary["shards"] > 1
        assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    AutoTokenizer.from_pretrained(out)
    layers = model.get_submodule("model.decoder.layers" if arch == "opt" else "model.layers")
    for i, layer in enumerate(layers):
        for name, keep in load_tensors(work.mask_path(i)).items():
            assert torch.equal(layer.get_submodule(name).weight == 0, ~keep)
    ids = load_tensors(work.tokens_path)["input_ids"][:2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, streamed_logits(work, "reconstructed", ids), atol=1e-5, rtol=1e-5)


def test_export_refuses_unfinished_reconstruction_and_nonempty_out(fresh_work, tmp_path):
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", device="cpu"))
    with work.update() as m:  # a reconstruction that stopped after its first window
        m["stages"]["reconstruct"] = {
            "status": "running",
            "signature": {},
            "run_id": "x",
            "summary": {},
            "progress": {"windows_total": 2},
        }
    with pytest.raises(FreelunchError, match="missing windows: 0, 1"):
        export(work, ExportConfig(out=str(tmp_path / "o")))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FreelunchError, match="not empty"):
        export(work, ExportConfig(out=str(tmp_path / "full"), stage="pruned"))
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_eval_every_stage_and_cache(fresh_work):
    work = fresh_work("llama")
    cfg = EvalConfig(ppl=[str(HELDOUT)], seqlen=SEQLEN, limit_sequences=8, device="cpu")
    dense = evaluate(work, cfg)["results"][0]
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.7, device="cpu"))
    pruned = evaluate(work, cfg)["results"][0]
    assert pruned["model"] == "pruned" and dense["model"] == "dense"
    assert pruned["ppl"] != dense["ppl"] and pruned["tokens"] == 8 * (SEQLEN - 1)
    again = evaluate(work, EvalConfig(ppl=[str(HELDOUT)], seqlen=SEQLEN, limit_sequences=8, stage="dense", device="cpu"))
    assert again["results"][0]["ppl"] == dense["ppl"]
    assert len(list((work.root / "eval").glob("*.json"))) == 2


def test_a_cast_that_overflows_the_export_dtype_is_an_error_naming_the_tensor(fresh_work, tmp_path, monkeypatch):
    import freelunch_cli.stages.export as export_module

    work = fresh_work("llama")
    load = export_module.load_tensors

    def large(path):  # one weight beyond float16's range (65504), as a badly scaled checkpoint has
        state = load(path)
        if "mlp.up_proj.weight" in state:
            state["mlp.up_proj.weight"] = state["mlp.up_proj.weight"].clone()
            state["mlp.up_proj.weight"][0, 0] = 1e6
        return state

    monkeypatch.setattr(export_module, "load_tensors", large)
    with pytest.raises(
        FreelunchError, match=r"model\.layers\.0\.mlp\.up_proj\.weight overflows --dtype float16 \(values up to 1e\+06"
    ):
        export(work, ExportConfig(out=str(tmp_path / "hf"), stage="dense", dtype="float16"))
    assert export(work, ExportConfig(out=str(tmp_path / "bf"), stage="dense", dtype="bfloat16"))["shards"] == 1

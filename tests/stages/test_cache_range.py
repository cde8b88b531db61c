"""The activation cache on a model whose residual stream leaves float16's range (real models' massive activations):
calibrate with the default --cache-dtype stores those boundaries in bfloat16 and says so, and later stages run on it."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from freelunch_cli.configs.stage_configs import PruneConfig, ReconstructConfig
from freelunch_cli.core.console import Reporter
from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
from freelunch_cli.stages.prune import prune
from freelunch_cli.stages.reconstruct import reconstruct
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import TensorRows, load_tensors, tensor_metadata

from helpers import CALIB, SEQLEN, make_tiny_model

SAMPLES = 4


def _overflowing_model(tmp_path):
    """The tiny llama with block 0's down projection scaled: its output (boundary 1) reaches about 3e5 in float32."""
    folder = make_tiny_model(tmp_path / "m", "llama")
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.mlp.down_proj.weight"] *= 3e5
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_boundaries_beyond_float16_are_stored_in_bfloat16_and_the_run_goes_on(tmp_path, capsys):
    folder = _overflowing_model(tmp_path)
    work = WorkDir(tmp_path / "w")
    cfg = CalibrateConfig(model=str(folder), data=str(CALIB), samples=SAMPLES, seqlen=SEQLEN, batch_size=2, device="cpu")
    summary = calibrate(work, cfg, Reporter())
    assert cfg.cache_dtype == "float16"  # the default
    assert [TensorRows(work.boundary_path("dense", b)).dtype for b in range(3)] == ["F16", "BF16", "BF16"]
    assert summary["cache_widened"] == {"bfloat16": [1, 2]}
    err = capsys.readouterr().err
    assert "hidden states in boundary_001.safetensors reach" in err and "stored in bfloat16" in err

    # the stored numbers are the model's own hidden states (computed here by transformers, in float32)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = load_tensors(work.tokens_path)["input_ids"]
    with torch.no_grad():
        hidden = lm(ids, output_hidden_states=True).hidden_states
    stored = [TensorRows(work.boundary_path("dense", b)).rows(0, SAMPLES).float() for b in range(2)]
    assert float(hidden[1].abs().max()) > 65504  # the case the test is about
    for b in range(2):
        err_b = (stored[b] - hidden[b]).abs().max() / hidden[b].abs().max()
        assert err_b < 1e-2, (b, float(err_b))

    # block 1's input statistics count each token once (the pass was run again in bfloat16, from a clean slate)
    # and are the squared sums of its normed input, the stored boundary 1
    path = work.input_stats_path(1)
    tokens = json.loads(tensor_metadata(path)["tokens"])
    assert set(tokens.values()) == {SAMPLES * SEQLEN}
    with torch.no_grad():
        normed = lm.model.layers[1].input_layernorm(stored[1])
    expected = normed.double().pow(2).sum((0, 1))
    torch.testing.assert_close(load_tensors(path)["self_attn.q_proj"], expected, rtol=1e-4, atol=0)

    # pruning's sparse stream and reconstruction's chained stream overflow as well: they widen and go on
    prune(work, PruneConfig(criterion="wanda", stats="sparse", keep_cache=True, device="cpu"))
    assert TensorRows(work.boundary_path("pruned", 1)).dtype == "BF16"
    out = reconstruct(work, ReconstructConfig(window="block", inputs="sparse", steps=2, keep_cache=True, device="cpu"))
    assert out["windows"] == 2
    rec = json.loads(work.window_record_path(0).read_text())
    assert rec["chained_dtype"] == "bfloat16"


def test_a_file_that_leaves_float16_late_is_written_again_from_its_first_row(tmp_path):
    """Only the last batch overflows: the float16 attempt is discarded, the producer runs again from row 0 (what it
    gathered on the way starts over), and the file holds every row in bfloat16."""
    from freelunch_cli.model.activations import write_activations
    from freelunch_cli.pruning.stats import StatsCollector

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(6, 3, 8)
    x[4:] *= 1e6  # samples 4-5: outputs far beyond 65504
    work = WorkDir(tmp_path / "w")
    work.root.mkdir()
    path = work.root / "acts.safetensors"
    collector, calls, said = StatsCollector({"lin": lin}), [], []

    def producer(rows):
        calls.append(rows.start)
        return lin(x[rows])

    with collector:
        got = write_activations(work, path, producer, 6, 3, 16, torch.float16, 2, "the test rows", said.append, collector.reset)
    assert got == torch.bfloat16 and calls == [0, 2, 4, 0, 2, 4]
    assert said and "beyond float16's range (65504): stored in bfloat16" in said[0]
    rows = TensorRows(path)
    assert rows.dtype == "BF16" and work.is_recorded(path)
    with torch.no_grad():
        torch.testing.assert_close(rows.rows(0, 6), lin(x).to(torch.bfloat16))
    st = collector.stats["lin"]
    assert st.tokens == 6 * 3
    torch.testing.assert_close(st.sumsq, x.double().pow(2).sum((0, 1)))

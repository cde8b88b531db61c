"""Reconstruction that transfers across weight scales (issue 30): the default rate is relative to each tensor's RMS,
and a window whose held-out loss rises keeps its starting weights or retries at a lower rate, and says so."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from freelunch_cli.configs.stage_configs import PruneConfig, QuantizeConfig, ReconstructConfig
from freelunch_cli.core.console import Reporter
from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
from freelunch_cli.stages.prune import prune
from freelunch_cli.stages.quantize import quantize
from freelunch_cli.stages.reconstruct import reconstruct
from freelunch_cli.training.loop import RMS_FLOOR, MaskedParams
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import load_tensors, read_json

from helpers import CALIB, SAMPLES, SEQLEN, make_tiny_model

SCALE = 0.01  # v_proj and up_proj x SCALE, o_proj and down_proj / SCALE: the same function, other weight scales


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """A calibrated, Wanda-pruned tiny llama reparametrised: v_proj and up_proj a hundred times smaller (RMS 2e-4,
    where a step of 1e-3 is five times the weight), o_proj and down_proj a hundred times larger. It computes what the
    tiny llama computes (each pair is linear in between) and Wanda's masks are the same, but a fixed rate of 1e-3
    makes its windows worse (0.017 -> 0.10 on held-out samples), where the unscaled model improves."""
    root = tmp_path_factory.mktemp("small-weights")
    folder = make_tiny_model(root / "m", "llama")
    state = load_file(folder / "model.safetensors")
    for name, value in state.items():
        if name.endswith(("mlp.up_proj.weight", "self_attn.v_proj.weight")):
            state[name] = value * SCALE
        if name.endswith(("mlp.down_proj.weight", "self_attn.o_proj.weight")):
            state[name] = value / SCALE
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    work = WorkDir(root / "w")
    calibrate(work, CalibrateConfig(model=str(folder), data=str(CALIB), samples=SAMPLES, seqlen=SEQLEN, device="cpu"))
    prune(work, PruneConfig(criterion="wanda", device="cpu"))
    return work


def _records(work, n, stage="reconstruct"):
    return [read_json(work.window_record_path(i, stage)) for i in range(n)]


def test_a_fixed_rate_that_makes_windows_worse_is_undone_and_said(small_weights, capsys):
    work = small_weights
    cfg = ReconstructConfig(window="block", lr=1e-3, retries=0, val_fraction=0.25, device="cpu")
    summary = reconstruct(work, cfg, Reporter(), force=True)
    records = _records(work, 2)
    kept = [i for i, r in enumerate(records) if r.get("kept_start")]
    assert kept, "the fixed rate 1e-3 should make a window of this model worse on held-out samples"
    for i in kept:
        r = records[i]
        assert r["rejected"][0]["lr"] == 1e-3 and r["rejected"][0]["loss"] > r["val_loss_before"]  # it did get worse
        assert r["val_loss_after"] == r["val_loss_before"] and r["steps"] == 0
        # the assembled block is the pruned one: the starting weights, unchanged
        pruned, recon = load_tensors(work.block_path("pruned", i)), load_tensors(work.block_path("reconstructed", i))
        assert all(torch.equal(pruned[k], recon[k]) for k in pruned)
    assert summary["windows_kept_start"] == kept
    err = " ".join(capsys.readouterr().err.split())  # the console wraps lines
    assert "loss rose at every rate (lr 0.001 -> " in err and "kept their starting weights" in err


def test_retries_lower_the_rate_until_the_window_improves(small_weights):
    work = small_weights
    summary = reconstruct(
        work, ReconstructConfig(window="block", lr=1e-3, retries=3, val_fraction=0.25, device="cpu"), force=True
    )
    records = _records(work, 2)
    assert any(r.get("rejected") for r in records)
    for r in records:
        assert r["val_loss_after"] <= r["val_loss_before"]  # never worse than it started
        n = len(r.get("rejected", []))
        if not r.get("kept_start"):
            assert r["lr"] == pytest.approx(1e-3 * 0.1**n)
    assert summary["windows_retried"] == [i for i, r in enumerate(records) if r.get("rejected") and not r["kept_start"]]


def test_the_default_rate_is_relative_to_the_weights_and_improves_every_window(small_weights):
    work = small_weights
    reconstruct(work, ReconstructConfig(window="block", device="cpu"), force=True)
    for r in _records(work, 2):
        assert not r.get("rejected")
        assert r["val_loss_after"] < r["val_loss_before"] and r["loss_after"] < r["loss_before"]
        assert r["lr"] == 5e-3 and r["guard"] == "held-out"


def test_quantize_windows_are_guarded_too(small_weights):
    work = small_weights
    quantize(work, QuantizeConfig(start="pruned", group_size=32, lr=1e-3, retries=0, steps=8, device="cpu"), force=True)
    records = _records(work, 2, "quantize")
    assert any(r.get("kept_start") for r in records)
    for r in records:
        assert r["val_loss_after"] <= r["val_loss_before"]
    quantize(work, QuantizeConfig(start="pruned", group_size=32, steps=8, device="cpu"), force=True)
    for r in _records(work, 2, "quantize"):
        assert not r.get("rejected") and r["val_loss_after"] < r["val_loss_before"]


def test_relative_rates_are_each_tensors_rms_times_the_rate():
    torch.manual_seed(0)
    w, b, z = (
        torch.nn.Parameter(torch.randn(8, 4) * 0.3),
        torch.nn.Parameter(torch.randn(8) * 5),
        torch.nn.Parameter(torch.zeros(8)),
    )
    f = torch.nn.Parameter(torch.zeros(8))
    groups = MaskedParams([w, b, z, f], {}, {id(f): 2.0}).groups(1e-2, relative=True)
    rates = {id(g["params"][0]): g["lr"] for g in groups}
    assert rates[id(w)] == pytest.approx(1e-2 * float(w.detach().pow(2).mean().sqrt()))
    assert rates[id(b)] == pytest.approx(1e-2 * float(b.detach().pow(2).mean().sqrt()))
    assert rates[id(z)] == pytest.approx(1e-2 * RMS_FLOOR)
    assert rates[id(f)] == pytest.approx(2e-2)  # an lr factor (quantization scales): as before


def test_held_out_samples_are_at_least_one_and_never_all():
    from freelunch_cli.engine.runner import held_out

    assert [held_out(n, 0.0625) for n in (1, 2, 4, 16, 128)] == [0, 1, 1, 1, 8]
    assert held_out(4, 0.9) == 3 and held_out(128, 0.0) == 0

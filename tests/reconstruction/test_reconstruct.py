"""Block reconstruction on every architecture: loss down, zeros kept, parameters counted."""

import pytest
import torch

from freelunch_cli.reconstruction.windows import enumerate_windows
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct
from freelunch_cli.workdir.files import load_tensors, read_json

from helpers import ARCHS


def test_window_enumeration():
    assert [(w.first, w.last) for w in enumerate_windows(5, "block")] == [(i, i) for i in range(5)]
    assert [(w.first, w.last) for w in enumerate_windows(5, "blocks:2")] == [(0, 1), (2, 3), (4, 4)]
    assert [(w.first, w.last) for w in enumerate_windows(5, "model")] == [(0, 4)]


@pytest.mark.parametrize("arch", ARCHS)
def test_block_reconstruction_lowers_loss_and_keeps_zeros(arch, fresh_work):
    work = fresh_work(arch)
    prune(work, PruneConfig(criterion="wanda", sparsity=0.5, device="cpu"))
    reconstruct(work, ReconstructConfig(window="block", lr=2e-3, epochs=3, batch_size=4, device="cpu"))
    for i in range(2):
        rec = read_json(work.window_record_path(i))
        assert rec["status"] == "done"
        assert rec["loss_after"] < 0.9 * rec["loss_before"]
        pruned = load_tensors(work.block_path("pruned", i))
        recon = load_tensors(work.block_path("reconstructed", i))
        masks = load_tensors(work.mask_path(i))
        changed = 0
        for name, keep in masks.items():
            w = recon[f"{name}.weight"]
            assert torch.all(w[~keep] == 0), name
            changed += int((w[keep] != pruned[f"{name}.weight"][keep]).sum())
        assert changed > 0  # the kept weights were trained
        # trainable parameter count equals a direct count of the block's tensors
        assert rec["trainable_params"] == sum(v.numel() for v in pruned.values())
        assert rec["trainable_nonzero"] == rec["trainable_params"] - sum(int((~k).sum()) for k in masks.values())


def test_default_is_two_passes_over_the_calibration_windows(fresh_work):
    """The default (chosen by bench/sweep.py: two epochs beat one in and out of domain) trains twice the steps of --epochs 1."""
    from helpers import SAMPLES

    steps = {}
    for label, cfg in (("default", ReconstructConfig(device="cpu")), ("one", ReconstructConfig(epochs=1, device="cpu"))):
        work = fresh_work("llama")
        prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
        reconstruct(work, cfg)
        steps[label] = read_json(work.window_record_path(0))["steps"]
    per_epoch = -(-SAMPLES // ReconstructConfig().batch_size)
    assert steps == {"default": 2 * per_epoch, "one": per_epoch}


def test_cli_defaults_are_the_library_defaults():
    """The CLI spells its defaults out (importing the config would load torch for --help); they must not drift."""
    import typer.main

    from freelunch_cli.cli import app

    command = typer.main.get_command(app).commands["reconstruct"]
    defaults = {p.name: p.default for p in command.params}
    cfg = ReconstructConfig()
    for name in ("window", "inputs", "peft", "lr", "epochs", "batch_size", "loss", "loss_samples"):
        assert defaults[name] == getattr(cfg, name), name


def test_window_parameter_files_are_deleted_once_the_blocks_are_assembled(fresh_work):
    """Each window's trained parameters are a second copy of what the assembled blocks hold: evicted after assembly
    (deleted, their records marked evicted: half the stage's disk for a full-weight window) unless --keep-cache; the
    windows still count as done."""
    from freelunch_cli.stages.reconstruct import reconstruct_status

    kept, dropped = fresh_work("llama"), fresh_work("llama")
    summary = {}
    for work, keep in ((kept, True), (dropped, False)):
        prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
        summary[keep] = reconstruct(work, ReconstructConfig(window="block", epochs=1, keep_cache=keep, device="cpu"))
        assert summary[keep]["windows"] == 2
    for i in range(2):
        assert kept.window_params_path(i).exists()
        assert not dropped.window_params_path(i).exists()
        assert dropped.is_evicted(dropped.window_params_path(i))
        # the same model either way (same seed, same data order), and nothing the stage recorded is missing
        for name, t in load_tensors(kept.block_path("reconstructed", i)).items():
            torch.testing.assert_close(load_tensors(dropped.block_path("reconstructed", i))[name], t)
    assert dropped.damaged_files("reconstruct") == []
    st = reconstruct_status(dropped)
    assert st["status"] == "done" and st["done"] == [0, 1] and st["pending"] == []
    # a resumed run finds the stage done and trains nothing again (the model files are not rewritten)
    before = [dropped.block_path("reconstructed", i).stat().st_mtime_ns for i in range(2)]
    assert reconstruct(dropped, ReconstructConfig(window="block", epochs=1, device="cpu"), resume=True) == summary[False]
    assert [dropped.block_path("reconstructed", i).stat().st_mtime_ns for i in range(2)] == before


def test_a_windows_data_held_in_memory_or_read_per_step_gives_the_same_model(fresh_work, monkeypatch):
    """Activation files that fit are read once per window and kept on the device; others are read per step."""
    import freelunch_cli.engine.runner as runner

    held, streamed = fresh_work("llama"), fresh_work("llama")
    kinds = {}
    real_rows = runner.WindowRunner.rows

    def spy(self, stream, name):
        rows = real_rows(self, stream, name)
        kinds.setdefault(type(rows).__name__, 0)
        kinds[type(rows).__name__] += 1
        return rows

    monkeypatch.setattr(runner.WindowRunner, "rows", spy)
    for work, share in ((held, runner.RESIDENT_SHARE), (streamed, 0.0)):
        monkeypatch.setattr(runner, "RESIDENT_SHARE", share)
        prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
        reconstruct(work, ReconstructConfig(window="block", epochs=1, device="cpu"))
    assert kinds["ResidentRows"] > 0 and kinds["TensorRows"] > 0
    for i in range(2):
        a, b = load_tensors(held.block_path("reconstructed", i)), load_tensors(streamed.block_path("reconstructed", i))
        assert all(torch.equal(a[k], b[k]) for k in a)

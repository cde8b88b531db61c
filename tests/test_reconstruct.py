import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ARCHS
from freelunch_cli.prune import PruneConfig, prune
from freelunch_cli.reconstruct import ReconstructConfig, reconstruct
from freelunch_cli.storage import load_tensors, read_json
from freelunch_cli.windows import enumerate_windows
from freelunch_cli.workdir import WorkDir


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


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "freelunch_cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_killed_reconstruction_resumes_to_the_same_model(fresh_work, tmp_path):
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
    twin = WorkDir(tmp_path / "twin")
    shutil.copytree(work.root, twin.root)
    args = ["reconstruct", "--window", "block", "--lr", "1e-3", "--epochs", "2", "--device", "cpu", "--quiet"]
    killed = _cli([*args, "--work", str(work.root)], {"FREELUNCH_KILL_AT": "reconstruct.window:1"})
    assert killed.returncode == -9
    assert read_json(work.window_record_path(0))["status"] == "done"
    assert not work.window_record_path(1).exists() or read_json(work.window_record_path(1))["status"] != "done"
    refused = _cli([*args, "--work", str(work.root)])
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    resumed = _cli([*args, "--work", str(work.root), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    straight = _cli([*args, "--work", str(twin.root)])
    assert straight.returncode == 0, straight.stderr
    for i in range(2):
        a = load_tensors(work.block_path("reconstructed", i))
        b = load_tensors(twin.block_path("reconstructed", i))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

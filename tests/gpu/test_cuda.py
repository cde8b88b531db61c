"""Every stage on CUDA against the CPU, on a tiny model (skipped without a GPU: `pytest -m cuda` on a GPU machine;
bench/gpu_check.sh runs them).

Tolerances: on CUDA float32 products use TF32 (10-bit mantissa) and the default compute is bfloat16, so activations
agree with the CPU's to about 1e-2 relative, masks chosen from them to 99% of their entries, and perplexities to 2%.
"""

import shutil

import pytest
import torch

from freelunch_cli.core import device as policy
from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
from freelunch_cli.stages.evaluate import EvalConfig, evaluate
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct
from freelunch_cli.stages.retrain import RetrainConfig, retrain
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import TensorRows, load_tensors

from helpers import CALIB, HELDOUT, SAMPLES, SEQLEN

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def pair(tiny_models, tmp_path_factory):
    """The same calibration on the CPU and on CUDA (float32, TF32 products)."""
    root = tmp_path_factory.mktemp("cuda")
    works = {}
    for device in ("cpu", "cuda"):
        works[device] = WorkDir(root / device)
        calibrate(
            works[device],
            CalibrateConfig(
                model=str(tiny_models["llama"]), data=str(CALIB), samples=SAMPLES, seqlen=SEQLEN, device=device, dtype="float32"
            ),
        )
    return works


def _copy(work: WorkDir, tmp_path, name: str) -> WorkDir:
    shutil.copytree(work.root, tmp_path / name)
    return WorkDir(tmp_path / name)


def test_the_device_policy_on_a_gpu():
    device, dtype = policy.resolve("auto", "auto")
    assert device.type == "cuda" and torch.cuda.current_device() == device.index
    assert dtype == torch.bfloat16 and torch.backends.cuda.matmul.allow_tf32


def test_calibrate_on_cuda_matches_the_cpu(pair):
    for b in range(3):
        cpu = TensorRows(pair["cpu"].boundary_path("dense", b)).rows(0, SAMPLES).float()
        gpu = TensorRows(pair["cuda"].boundary_path("dense", b)).rows(0, SAMPLES).float()
        torch.testing.assert_close(gpu, cpu, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_prune_on_cuda_matches_the_cpu(criterion, pair, tmp_path):
    works = {d: _copy(pair[d], tmp_path, d) for d in pair}
    for device, work in works.items():
        prune(work, PruneConfig(criterion=criterion, sparsity=0.5, device=device, dtype="float32"))
    for i in range(2):
        cpu, gpu = load_tensors(works["cpu"].mask_path(i)), load_tensors(works["cuda"].mask_path(i))
        agree = sum(int((cpu[k] == gpu[k]).sum()) for k in cpu) / sum(v.numel() for v in cpu.values())
        assert agree > 0.99, (i, agree)
        assert all(int((~gpu[k]).sum()) == int((~cpu[k]).sum()) for k in cpu)  # exact counts on both


@pytest.mark.parametrize("resident", [True, False])
def test_reconstruct_on_cuda_in_bfloat16_keeps_the_zeros_and_lowers_the_loss(resident, pair, tmp_path, monkeypatch):
    import freelunch_cli.engine.runner as runner

    if not resident:
        monkeypatch.setattr(runner, "RESIDENT_SHARE", 0.0)  # pinned, non-blocking copies per step, prefetched
    work = _copy(pair["cuda"], tmp_path, "w")
    prune(work, PruneConfig(criterion="wanda", sparsity=0.5, device="cuda"))
    s = reconstruct(work, ReconstructConfig(window="block", lr=2e-3, epochs=3, device="cuda", kl_weight=0.1))
    assert s["config"]["dtype"] == "bfloat16" and s["loss_after"] < 0.9 * s["loss_before"]
    for i in range(2):
        recon = load_tensors(work.block_path("reconstructed", i))
        for name, keep in load_tensors(work.mask_path(i)).items():
            assert torch.all(recon[f"{name}.weight"][~keep] == 0)


def test_eval_and_retrain_on_cuda(pair, tmp_path):
    work = _copy(pair["cuda"], tmp_path, "w")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cuda"))
    ev = EvalConfig(ppl=[str(HELDOUT)], seqlen=SEQLEN, limit_sequences=8, stage="pruned")
    cpu = evaluate(work, EvalConfig(**{**ev.__dict__, "device": "cpu", "dtype": "float32"}))["results"][0]["ppl"]
    gpu = evaluate(work, EvalConfig(**{**ev.__dict__, "device": "cuda", "dtype": "float32"}))["results"][0]["ppl"]
    assert gpu == pytest.approx(cpu, rel=2e-2)
    for dtype in ("bfloat16", "float16"):  # float16 with a gradient scaler
        s = retrain(work, RetrainConfig(start="pruned", steps=3, lr=1e-4, device="cuda", dtype=dtype), force=True)
        assert s["steps"] == 3 and s["dtype"] == dtype


@pytest.mark.parametrize("resident", [True, False])
def test_prefetched_submodule_windows_with_the_kl_term_make_no_host_sync(resident, pair, tmp_path, monkeypatch):
    """FREELUNCH_SYNC_DEBUG=error makes every host sync inside the training steps raise (the loss check every 16
    steps excepted): streamed or resident, with the dense references and the head on the training thread, a step
    never waits on the host; pinned staging buffers are allocated once per window and file, not per batch."""
    import freelunch_cli.engine.runner as runner

    if not resident:
        monkeypatch.setattr(runner, "RESIDENT_SHARE", 0.0)
    stagers = []
    real_init = runner.Stager.__init__

    def init(self, device):
        real_init(self, device)
        stagers.append(self)

    monkeypatch.setattr(runner.Stager, "__init__", init)
    monkeypatch.setenv("FREELUNCH_SYNC_DEBUG", "error")
    work = _copy(pair["cuda"], tmp_path, "w")
    prune(work, PruneConfig(criterion="wanda", sparsity=0.5, device="cuda"))
    cfg = ReconstructConfig(window="submodule", lr=2e-3, epochs=3, batch_size=3, device="cuda", kl_weight=0.1)
    s = reconstruct(work, cfg)  # 16 samples in batches of 3: a short last batch
    assert s["windows"] == 4 and s["loss_after"] < s["loss_before"]
    used = [st for st in stagers if st._slots]
    assert used and all(st.allocations <= runner.Stager.SLOTS * len(st._slots) for st in used)
    if not resident:
        assert any(key[1] == "rows" for st in used for key in st._slots)


def test_deterministic_resume_on_cuda_is_bit_identical(pair, tmp_path):
    """With FREELUNCH_DETERMINISTIC=1 a reconstruction killed after two windows and resumed equals an uninterrupted
    one bit for bit (bfloat16, SDPA backward, the KL term's head)."""
    import os
    import subprocess
    import sys

    base = _copy(pair["cuda"], tmp_path, "base")
    prune(base, PruneConfig(criterion="wanda", sparsity=0.5, device="cuda"))
    whole, resumed = _copy(base, tmp_path, "whole"), _copy(base, tmp_path, "resumed")
    args = ["--window", "submodule", "--lr", "2e-3", "--epochs", "2", "--kl-weight", "0.1", "--device", "cuda", "--quiet"]
    env = {**os.environ, "FREELUNCH_DETERMINISTIC": "1"}

    def run(work, *extra, kill=None):
        e = {**env, "FREELUNCH_KILL_AT": kill} if kill else env
        cmd = [sys.executable, "-m", "freelunch_cli", "reconstruct", "--work", str(work.root), *args, *extra]
        return subprocess.run(cmd, env=e, capture_output=True, text=True)

    assert run(whole).returncode == 0
    assert run(resumed, kill="window.train:3").returncode != 0  # killed in its third window
    done = run(resumed, "--resume")
    assert done.returncode == 0, done.stderr
    for i in range(2):
        a, b = load_tensors(whole.block_path("reconstructed", i)), load_tensors(resumed.block_path("reconstructed", i))
        assert all(torch.equal(a[k], b[k]) for k in a), i

"""Retraining sharded with FSDP2 under torchrun (two CPU processes, gloo): the same model as one process, masks
exact, sharded checkpoints that resume bit for bit on the same world size and are refused on another; and the
memory estimate that refuses a run which cannot fit."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from freelunch_cli.core.console import Reporter
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.model.assembly import materialize
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.retrain import RetrainConfig, check_memory, retrain
from freelunch_cli.training.memory import processes_needed
from freelunch_cli.workdir.files import load_tensors

from helpers import CALIB

# FSDP sums gradients in another order than one process: float32 rounding, which AdamW's normalisation magnifies for
# weights whose gradients are near zero. The tolerance is on what training changed: the sharded run's update differs
# from one process's by at most 1% of its size (relative Frobenius norm over each block).
TOLERANCE = 1e-2


def torchrun(work, *args, env=None):
    """``freelunch retrain`` in two torchrun processes (gloo on the CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "freelunch_cli"]
    return subprocess.run(
        [*cmd, "retrain", "--work", str(work.root), *args, "--device", "cpu", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def blocks(work, model="retrained"):
    return [load_tensors(work.block_path(model, i)) for i in range(2)]


def assert_close(a: list[dict], b: list[dict], start: list[dict], tolerance: float = TOLERANCE) -> None:
    """The updates ``a - start`` and ``b - start`` agree within ``tolerance`` of their size (relative Frobenius norm)."""
    for x, y, s in zip(a, b, start):
        assert sorted(x) == sorted(y)
        diff = sum(((x[k] - y[k]).double() ** 2).sum() for k in x) ** 0.5
        update = sum(((y[k] - s[k]).double() ** 2).sum() for k in y) ** 0.5
        assert update > 0 and diff <= tolerance * update, (float(diff), float(update))


def assert_masks_kept(work) -> None:
    for i, state in enumerate(blocks(work)):
        for name, keep in load_tensors(work.mask_path(i)).items():
            assert torch.all(state[f"{name}.weight"][~keep] == 0), f"block {i} {name}"


def pruned(fresh_work, arch, skip=()):
    work = fresh_work(arch)
    prune(work, PruneConfig(criterion="magnitude", skip=list(skip), device="cpu"))
    return work


def read_sharded_checkpoint(work) -> dict[str, torch.Tensor]:
    """The model of the last sharded checkpoint, whole, as FSDP left it (before the end merges and re-applies masks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    folder = work.retrain_sharded_checkpoint_dir
    path = folder / json.loads((folder / "checkpoint.json").read_text())["folder"]
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("model.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        dcp.load(state, checkpoint_id=str(path))
    return state


def test_fsdp_full_retraining_keeps_masks_and_equals_one_process(fresh_work):
    """Five sequences in batches of four: the second batch of each epoch leaves one process a sequence and the other
    none (weighted by share, at weight 0). Killed at step 3, the step-2 checkpoint holds every pruned weight at
    exactly zero while the kept ones trained; resumed, the model equals one process's within tolerance."""
    sharded, single = pruned(fresh_work, "llama"), pruned(fresh_work, "llama")
    args = ["--peft", "full", "--lr", "1e-3", "--data", str(CALIB), "--samples", "5", "--steps", "4", "--save-every", "2"]
    killed = torchrun(sharded, *args, env={"FREELUNCH_KILL_AT": "retrain.step:3"})
    assert killed.returncode != 0
    saved = read_sharded_checkpoint(sharded)
    for i, before in enumerate(blocks(sharded, "pruned")):
        for name, keep in load_tensors(sharded.mask_path(i)).items():
            w = saved[f"model.lm.model.layers.{i}.{name}.weight"]
            assert torch.all(w[~keep] == 0) and not torch.equal(w[keep], before[f"{name}.weight"][keep])
    done = torchrun(sharded, *args, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    retrain(single, RetrainConfig(peft="full", lr=1e-3, data=str(CALIB), samples=5, steps=4, save_every=2, device="cpu"))
    s = sharded.stage("retrain").summary
    assert s["processes"] == 2 and s["steps"] == 4
    assert abs(s["last_loss"] - single.stage("retrain").summary["last_loss"]) < 1e-4
    assert_close(blocks(sharded), blocks(single), blocks(single, "pruned"))
    assert_masks_kept(sharded)
    x, y = (load_tensors(w.own_rest_path("retrained")) for w in (sharded, single))
    assert_close([x], [y], [load_tensors(single.rest_path("dense"))])  # embeddings and head train too


def test_fsdp_masked_lora_resumes_from_its_sharded_checkpoint(fresh_work):
    """Qwen2 (tied embeddings) with one matrix left dense (no mask, an unmasked adapter), sparse adapters with
    recomputation: killed at step 3, resumed from the step-2 sharded checkpoint, the model equals an uninterrupted
    sharded run bit for bit and one process's within tolerance."""
    killed, whole, single = (pruned(fresh_work, "qwen2", skip=["mlp.down_proj"]) for _ in range(3))  # one matrix dense
    args = ["--peft", "masked-lora", "--grad-checkpoint", "--steps", "6", "--save-every", "2"]
    run = torchrun(killed, *args, env={"FREELUNCH_KILL_AT": "retrain.step:3"})
    assert run.returncode != 0
    folder = killed.retrain_sharded_checkpoint_dir
    pointer = json.loads((folder / "checkpoint.json").read_text())
    assert pointer["step"] == 2 and pointer["world_size"] == 2 and (folder / pointer["folder"] / ".metadata").exists()
    with pytest.raises(FreelunchError, match="written by 2 processes, but this run has 1 process"):
        retrain(killed, RetrainConfig(peft="masked-lora", grad_checkpoint=True, steps=6, save_every=2, device="cpu"), resume=True)
    resumed = torchrun(killed, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not folder.exists()  # checkpoints go once the model is written
    assert torchrun(whole, *args).returncode == 0
    for x, y in zip(blocks(killed), blocks(whole)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert killed.stage("retrain").summary["last_loss"] == whole.stage("retrain").summary["last_loss"]
    retrain(single, RetrainConfig(peft="masked-lora", grad_checkpoint=True, steps=6, save_every=2, device="cpu"))
    assert_close(blocks(killed), blocks(single), blocks(single, "pruned"))
    assert_masks_kept(killed)
    rest = load_tensors(killed.own_rest_path("retrained"))
    assert "lm_head.weight" not in rest  # tied: the head is the embedding, written once
    assert torch.equal(rest["model.embed_tokens.weight"], load_tensors(killed.rest_path("dense"))["model.embed_tokens.weight"])


def test_the_memory_estimate_counts_the_real_model_and_refuses_what_cannot_fit(fresh_work):
    work = pruned(fresh_work, "llama")
    cfg = RetrainConfig(peft="full", max_memory="1TiB", device="cpu").resolved("pruned")
    est = check_memory(work, cfg, "pruned", None, "cpu", torch.float32, Reporter(quiet=True))
    model = materialize(work, "pruned", "cpu", torch.float32)
    params = sum(p.numel() for p in model.parameters())
    masked = sum(k.numel() for i in range(2) for k in load_tensors(work.mask_path(i)).values())
    assert est["weights"] == 4 * params and est["grads_adam"] == 12 * params and est["masks"] == masked
    lora = check_memory(
        work,
        RetrainConfig(peft="lora", max_memory="1TiB").resolved("pruned"),
        "pruned",
        None,
        "cpu",
        torch.float32,
        Reporter(quiet=True),
    )
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    adapters = sum(16 * (lin.in_features + lin.out_features) for lin in linears)  # rank 16: A and B
    assert lora["grads_adam"] == 12 * adapters and lora["weights"] == 4 * params and lora["masks"] == 0
    budget = est["total"] // 2
    with pytest.raises(
        FreelunchError, match=r"needs about .* GiB in one process .* more than .* --max-memory; it fits on \d+ GPUs"
    ):
        retrain(work, RetrainConfig(peft="full", max_memory=str(budget), device="cpu"))
    assert work.stage("retrain") is None  # refused before anything was written

    def estimate_for(world):
        return {"total": 100 + 1000 // world}

    assert processes_needed(estimate_for, 400) == 4 and processes_needed(estimate_for, 99) is None


def test_sharded_retraining_refuses_an_uneven_batch_and_float16(fresh_work, monkeypatch):
    work = pruned(fresh_work, "llama")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FreelunchError, match="--batch-size 3 must be a multiple of the 2 torchrun processes"):
        retrain(work, RetrainConfig(batch_size=3, device="cpu"))
    with pytest.raises(FreelunchError, match="use --dtype bfloat16"):
        retrain(work, RetrainConfig(dtype="float16", device="cpu"))
    with pytest.raises(FreelunchError, match="--max-memory must be a size"):
        retrain(work, RetrainConfig(max_memory="lots", device="cpu"))


def test_a_world_of_one_shards_only_when_asked():
    """bench/gpu_check.sh checks the FSDP2 path on one GPU: FREELUNCH_FSDP=1 under torchrun makes a world of one."""
    from freelunch_cli.training.fsdp import World, torchrun_world

    one = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    assert torchrun_world(one) is None and torchrun_world({"FREELUNCH_FSDP": "1"}) is None
    assert torchrun_world({**one, "FREELUNCH_FSDP": "1"}) == World(0, 1, 0)
    assert torchrun_world({"RANK": "1", "WORLD_SIZE": "2"}) == World(1, 2, 0)

"""Sharded reconstruction: concurrent workers, takeover of a dead worker's window, status, memory choice."""

import signal
import time

import pytest
import torch

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.engine.claims import detect_shard
from freelunch_cli.model.skeleton import Skeleton
from freelunch_cli.reconstruction.memory import block_numbers, choose_window, estimate
from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct, reconstruct_status
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import load_tensors, read_json

from helpers import CALIB, calibrated_work, clone_work, hold_first_claimer_until_both_claim, make_tiny_model, start_worker


@pytest.fixture(scope="module")
def pruned4(tmp_path_factory):
    """A pruned 4-block model: 8 submodule windows to share."""
    root = tmp_path_factory.mktemp("scale")
    work = calibrated_work(root)
    prune(work, PruneConfig(criterion="wanda", device="cpu"))
    return work


ARGS = ["--window", "submodule", "--lr", "1e-3", "--epochs", "3", "--device", "cpu", "--keep-cache", "--quiet"]


def worker(work, *extra, env=None):
    return start_worker("reconstruct", work, *ARGS, *extra, env=env)


def test_shard_detection():
    s = detect_shard("1/3", {})
    assert (s.index, s.count, s.source) == (1, 3, "--shard") and s.owns(4) and not s.owns(3)
    assert detect_shard("0/1", {"RANK": "1", "WORLD_SIZE": "2", "SLURM_ARRAY_TASK_ID": "1"}) is None  # alone
    t = detect_shard(None, {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert (t.index, t.count, t.source) == (2, 4, "torchrun")
    a = detect_shard(None, {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10"})
    assert (a.index, a.count, a.source) == (1, 4, "slurm")
    assert detect_shard(None, {}) is None and detect_shard(None, {"WORLD_SIZE": "1", "RANK": "0"}) is None
    for bad in ("3/3", "x", "1-2"):
        with pytest.raises(FreelunchError, match="--shard must be I/N"):
            detect_shard(bad, {})


def test_two_concurrent_shards_equal_one_worker(pruned4, tmp_path):
    single = clone_work(pruned4, tmp_path / "single")
    shared = clone_work(pruned4, tmp_path / "shared")
    one = worker(single)
    assert one.wait() == 0, one.stderr.read()
    procs = [worker(shared, "--shard", f"{i}/2") for i in range(2)]
    hold_first_claimer_until_both_claim(shared.root / "windows", procs)
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert shared.stage("reconstruct").status == "done"
    for w in range(8):
        rec = read_json(shared.window_record_path(w))
        assert rec["status"] == "done" and rec["attempt"] == 1
        assert [p.name for p in (shared.root / "windows").glob(f"{w:03d}.claim.*")] == [f"{w:03d}.claim.1"]  # run exactly once
    assert len({read_json(shared.window_record_path(w))["worker"] for w in range(8)}) == 2  # both workers took part
    for i in range(4):
        a, b = load_tensors(single.block_path("reconstructed", i)), load_tensors(shared.block_path("reconstructed", i))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_dead_workers_window_is_taken_over(pruned4, tmp_path):
    work = clone_work(pruned4, tmp_path / "w")
    doomed = worker(work, "--shard", "0/2", "--stale-after", "2", env={"FREELUNCH_KILL_AT": "train.step:3"})
    assert doomed.wait() == -9
    st = reconstruct_status(work, stale_after=2)
    assert st["done"] == [] and len(st["running"]) + len(st["stale"]) == 1  # its claim is left behind
    time.sleep(2.5)
    assert len(reconstruct_status(work, stale_after=2)["stale"]) == 1
    rescuer = worker(work, "--shard", "1/2", "--stale-after", "2")
    out, err = rescuer.communicate()
    assert rescuer.returncode == 0, err
    rec = read_json(work.window_record_path(0))
    assert rec["status"] == "done" and rec["attempt"] == 2  # taken over, not lost
    assert work.stage("reconstruct").status == "done"
    assert reconstruct_status(work, 2)["done"] == list(range(8))


def test_status_and_cache_deletion(pruned4, tmp_path):
    work = clone_work(pruned4, tmp_path / "w")
    assert reconstruct_status(work)["status"] == "not started"
    reconstruct(work, ReconstructConfig(window="block", lr=1e-3, device="cpu"))
    st = reconstruct_status(work)
    assert st["done"] == [0, 1, 2, 3] and st["pending"] == st["running"] == st["stale"] == []
    assert not any(work.boundary_path("dense", b).exists() for b in range(5))  # nothing needs them any more
    assert all(work.is_evicted(work.boundary_path("dense", b)) for b in range(5))  # on purpose: not damage
    cfg = CalibrateConfig(**work.stage("calibrate").summary["config"])
    for resume in (False, True):  # calibrate is done: rerun as it was, it recomputes nothing
        assert calibrate(work, cfg, resume=resume) == work.stage("calibrate").summary
        assert not any(work.boundary_path("dense", b).exists() for b in range(5))


def test_sharding_refuses_sparse_inputs_and_force(pruned4):
    with pytest.raises(FreelunchError, match="cannot be sharded"):
        reconstruct(pruned4, ReconstructConfig(inputs="sparse", shard="0/2"))
    with pytest.raises(FreelunchError, match="--prepare --force"):
        reconstruct(pruned4, ReconstructConfig(shard="0/2"), force=True)


def test_memory_estimate_and_auto_window(pruned4):
    sk = Skeleton.from_work(pruned4, "dense", "cpu", torch.float32)
    nums = block_numbers(sk.config, sk.templates[0])
    assert nums["params"] == sum(p.numel() for p in sk.build_block(0).parameters())
    block = estimate("block", 1, nums, 4, 32)
    assert block["weights_grads_adam"] == 16 * nums["params"]
    assert estimate("blocks", 2, nums, 4, 32)["total"] > block["total"] > estimate("matrix", 1, nums, 4, 32)["total"]
    assert choose_window(4, nums, 4, 32, 1 << 40)[0] == "model"
    assert choose_window(4, nums, 4, 32, block["total"])[0] == "block"
    assert choose_window(4, nums, 4, 32, estimate("submodule", 1, nums, 4, 32)["total"])[0] == "submodule"
    with pytest.raises(FreelunchError, match="no window fits"):
        choose_window(4, nums, 4, 32, 1000)


def test_auto_window_runs_the_chosen_kind(pruned4, tmp_path):
    work = clone_work(pruned4, tmp_path / "w")
    sk = Skeleton.from_work(work, "dense", "cpu", torch.float32)
    budget = estimate("blocks", 2, block_numbers(sk.config, sk.templates[0]), 4, 32)["total"]
    s = reconstruct(work, ReconstructConfig(window="auto", max_memory=str(budget), lr=1e-3, device="cpu"))
    assert s["window"] == "blocks:2" and s["windows"] == 2


def test_cache_dir_holds_the_activations(tmp_path):
    model = make_tiny_model(tmp_path / "model", "llama")
    work = WorkDir(tmp_path / "work")
    scratch = tmp_path / "scratch"
    calibrate(
        work, CalibrateConfig(model=str(model), data=str(CALIB), samples=8, seqlen=32, device="cpu", cache_dir=str(scratch))
    )
    assert not (work.root / "acts").exists()
    files = list(scratch.glob("freelunch-work-*/dense/boundary_*.safetensors"))
    assert len(files) == 3 and all(f"acts/dense/{f.name}" in work.manifest()["files"] for f in files)
    prune(work, PruneConfig(criterion="wanda", stats="sparse", device="cpu"))
    reconstruct(work, ReconstructConfig(window="block", inputs="sparse", lr=1e-3, device="cpu"))
    assert work.stage("reconstruct").status == "done"
    assert WorkDir.owner_stage_of("acts/pruned/boundary_001.safetensors") == "prune"
    assert WorkDir.owner_stage_of("acts/dense/boundary_001.safetensors") == "calibrate"
    assert WorkDir.owner_stage_of("acts/recon/mid_001.safetensors") == "reconstruct"


def test_workers_share_the_writing_of_the_model(pruned4, tmp_path):
    """Each worker writes its share of the blocks (block i is shard i mod N's) and then any free one, skips a block
    another worker is writing, and the worker that finishes waits for it; the blocks equal one process's."""
    from freelunch_cli.engine.claims import Shard
    from freelunch_cli.engine.runner import RECONSTRUCT, WindowRunner
    from freelunch_cli.engine.windowed import assemble_blocks, plan_windows
    from freelunch_cli.workdir.locks import locked_file

    work = clone_work(pruned4, tmp_path / "w")
    cfg = ReconstructConfig(window="block", lr=1e-3, epochs=1, device="cpu", dtype="float32", keep_cache=True)
    reconstruct(work, cfg)
    want = [load_tensors(work.block_path("reconstructed", i)) for i in range(4)]
    windows = plan_windows(work, "block")
    runner = WindowRunner(work, cfg, windows, torch.device("cpu"), torch.float32, RECONSTRUCT)
    work.forget([work.rel(work.block_path("reconstructed", i)) for i in range(4)])
    with locked_file(work.lock_path("assemble-reconstruct-001"), blocking=False):  # another worker is writing block 1
        assert assemble_blocks(work, runner, Shard(1, 2, "--shard"), wait=False) == [3, 0, 2]
    assert assemble_blocks(work, runner, Shard(1, 2, "--shard"), wait=True) == [1]
    for i in range(4):
        got = load_tensors(work.block_path("reconstructed", i))
        assert got.keys() == want[i].keys() and all(torch.equal(got[k], want[i][k]) for k in got)
    runner.forget_assembled(windows[2])  # a window that runs again: the blocks it touches are written anew
    assert not runner.assembled(2) and runner.assembled(1) and not work.block_path("reconstructed", 2).exists()


def _stopped(proc, timeout: float = 120.0) -> None:
    """Wait until ``proc`` has stopped itself (SIGSTOP: state T in /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
            return
        time.sleep(0.05)
    raise AssertionError("the worker never stopped")


def _files(work) -> dict:
    """Bytes of every file of the finished stage: the model's blocks and the window records."""
    paths = sorted(work.model_dir("reconstructed").glob("block_*.safetensors")) + sorted(work.windows_dir().glob("*.json"))
    return {p.name: p.read_bytes() for p in paths}


BLOCK = ["--window", "block", "--epochs", "1", "--device", "cpu", "--quiet", "--stale-after", "2"]


def test_a_suspended_worker_that_wakes_after_the_takeover_leaves_the_finished_stage_intact(pruned4, tmp_path):
    """A worker stopped (SIGSTOP) right after claiming window 0, continued once another worker took its windows over
    and finished the stage: it writes nothing (no running record over a done one, no assembled block deleted)."""
    work = clone_work(pruned4, tmp_path / "w")
    sleeper = start_worker("reconstruct", work, *BLOCK, "--shard", "0/2", env={"FREELUNCH_KILL_AT": "reconstruct.claimed:1:STOP"})
    try:
        _stopped(sleeper)
        reconstruct(work, ReconstructConfig(window="block", epochs=1, device="cpu", shard="1/2", stale_after=2))
        assert work.stage("reconstruct").status == "done"
        assert read_json(work.window_record_path(0))["attempt"] == 2  # taken over
        finished, manifest = _files(work), work.manifest()
    finally:
        sleeper.send_signal(signal.SIGCONT)
    out, err = sleeper.communicate(timeout=300)
    assert sleeper.returncode == 0, err
    assert _files(work) == finished and work.manifest()["stages"] == manifest["stages"]
    assert work.manifest()["files"] == manifest["files"]
    assert all(work.problem(work.block_path("reconstructed", i)) is None for i in range(4))


def test_a_hung_worker_loses_its_claim(pruned4, tmp_path):
    """A worker that hangs while alive (its process would still run a heartbeat thread) stops making progress, so its
    claim goes stale and another worker takes the window over and finishes the stage."""
    work = clone_work(pruned4, tmp_path / "w")
    hung = start_worker("reconstruct", work, *BLOCK, "--shard", "0/2", env={"FREELUNCH_KILL_AT": "window.train:1:HANG"})
    try:
        deadline = time.time() + 120
        while not (work.windows_dir() / "000.claim.1").exists() and time.time() < deadline:
            time.sleep(0.05)
        rescuer = start_worker("reconstruct", work, *BLOCK, "--shard", "1/2")
        _, err = rescuer.communicate(timeout=300)
        assert rescuer.returncode == 0, err
        assert hung.poll() is None  # alive all along
    finally:
        hung.kill()
        hung.wait()
    assert work.stage("reconstruct").status == "done"
    assert read_json(work.window_record_path(0))["attempt"] == 2

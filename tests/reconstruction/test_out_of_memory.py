"""A window that runs out of memory on one worker is released to the others at once; alone, the worker says what
helps and a --resume finishes."""

import os
import time
from dataclasses import replace

import pytest
import torch

from freelunch_cli.core import kill_points
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import load_tensors, read_json

from helpers import calibrated_work, clone_work, start_worker

ARGS = ["--window", "block", "--lr", "1e-3", "--epochs", "2", "--device", "cpu", "--keep-cache", "--quiet"]
CFG = ReconstructConfig(window="block", lr=1e-3, epochs=2, device="cpu", keep_cache=True)


@pytest.fixture(scope="module")
def pruned_and_reference(tmp_path_factory):
    """A pruned 4-block model (4 block windows), and a clone reconstructed by one uninterrupted process."""
    root = tmp_path_factory.mktemp("oom")
    work = calibrated_work(root)
    prune(work, PruneConfig(criterion="wanda", device="cpu"))
    ref = clone_work(work, root / "ref")
    reconstruct(ref, CFG)
    return work, ref


def same_model(a: WorkDir, b: WorkDir) -> None:
    for i in range(4):
        x, y = load_tensors(a.block_path("reconstructed", i)), load_tensors(b.block_path("reconstructed", i))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), i


def worker(work, *extra, env=None):
    return start_worker("reconstruct", work, *ARGS, *extra, env=env)


def test_a_window_out_of_memory_is_run_by_the_other_worker(pruned_and_reference, tmp_path):
    pruned, ref = pruned_and_reference
    work = clone_work(pruned, tmp_path / "w")
    short = worker(work, "--shard", "0/2", "--stale-after", "60", env={"FREELUNCH_KILL_AT": "window.train:1:OOM"})
    claim = work.windows_dir() / "000.claim.1"
    deadline = time.time() + 120
    while not (claim.exists() and claim.stat().st_mtime < 1) and time.time() < deadline and short.poll() is None:
        time.sleep(0.05)  # its first window, 0, runs out of memory and is released (dated back)
    assert claim.exists() and claim.stat().st_mtime < 1
    helper = reconstruct(WorkDir(work.root), replace(CFG, shard="1/2", stale_after=60))  # this process: the other worker
    out, err = short.communicate()
    assert short.returncode == 0, err  # the short worker waited for a taker instead of failing
    assert f"window 0 ran out of memory on this worker ({os.uname().nodename}:{short.pid})" in err
    assert 0 in helper.get("ran_here", helper.get("ran"))  # whichever of the two assembled
    rec = read_json(work.window_record_path(0))
    assert rec["status"] == "done" and rec["attempt"] == 2 and rec["worker"].endswith(f":{os.getpid()}")
    assert work.stage("reconstruct").status == "done"
    same_model(ref, work)


def test_a_lone_worker_out_of_memory_names_the_window_and_resume_finishes(pruned_and_reference, tmp_path, monkeypatch):
    pruned, ref = pruned_and_reference
    work = clone_work(pruned, tmp_path / "w")
    monkeypatch.setenv("FREELUNCH_KILL_AT", "window.train:2:OOM")
    monkeypatch.setattr(kill_points, "_reached", {})
    with pytest.raises(FreelunchError) as e:
        reconstruct(work, CFG)
    assert (
        "window 1 ran out of memory on this worker and no other worker took it over" in str(e.value)
        and "--resume" in str(e.value)
        and "\n" not in str(e.value)
    )
    assert e.value.exit_code == 2
    assert [read_json(work.window_record_path(w))["status"] for w in range(4)] == ["done", "running", "done", "done"]
    assert work.stage("reconstruct").status == "running"
    monkeypatch.delenv("FREELUNCH_KILL_AT")
    reconstruct(work, CFG, resume=True)
    assert work.stage("reconstruct").status == "done" and read_json(work.window_record_path(1))["attempt"] == 2
    same_model(ref, work)

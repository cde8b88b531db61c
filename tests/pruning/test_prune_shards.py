"""Sharded prune: concurrent workers share the blocks of one work directory and give what one process gives."""

import subprocess
import sys

import pytest
import torch

from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import load_tensors, read_json

from helpers import calibrated_work, clone_work, hold_first_claimer_until_both_claim, start_worker

ARGS = ["--criterion", "sparsegpt", "--sparsity", "0.5", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def calibrated4(tmp_path_factory):
    """A calibrated 4-block model: 4 blocks to share."""
    return calibrated_work(tmp_path_factory.mktemp("prune-shards"))


def worker(work, *extra):
    return start_worker("prune", work, *ARGS, *extra)


def same_model(a: WorkDir, b: WorkDir, n: int = 4) -> None:
    for i in range(n):
        for path in (WorkDir.block_path, lambda w, _s, i: w.mask_path(i)):
            x, y = load_tensors(path(a, "pruned", i)), load_tensors(path(b, "pruned", i))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (i, path)
    ra, rb = read_json(a.prune_report_path), read_json(b.prune_report_path)
    assert ra == rb


def test_two_concurrent_prune_workers_equal_one_process(calibrated4, tmp_path):
    single, shared = clone_work(calibrated4, tmp_path / "single"), clone_work(calibrated4, tmp_path / "shared")
    prune(single, PruneConfig(criterion="sparsegpt", device="cpu"))
    procs = [worker(shared, "--shard", f"{i}/2") for i in range(2)]
    hold_first_claimer_until_both_claim(shared.prune_claims_dir, procs)
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert shared.stage("prune").status == "done"
    same_model(single, shared)
    workers = {read_json(shared.prune_block_record_path(i))["worker"] for i in range(4)}
    assert len(workers) == 2 and sorted(workers) == shared.stage("prune").summary["workers"]  # both took part
    for i in range(4):  # each block pruned exactly once
        assert [p.name for p in shared.prune_claims_dir.glob(f"{i:03d}.claim.*")] == [f"{i:03d}.claim.1"]


def test_one_shard_alone_helps_with_the_rest_and_refusals(calibrated4, tmp_path):
    single, alone = clone_work(calibrated4, tmp_path / "single"), clone_work(calibrated4, tmp_path / "alone")
    cfg = dict(criterion="wanda", sparsity=0.5, owl=0.05, device="cpu")
    prune(single, PruneConfig(**cfg))
    s = prune(alone, PruneConfig(**cfg, shard="0/2", stale_after=5))  # its blocks 0, 2, then 1, 3 nobody else took
    assert s["ran_here"] == [0, 2, 1, 3] and alone.stage("prune").status == "done"
    assert alone.progress("prune")["block_sparsity"] == single.progress("prune")["block_sparsity"]  # OWL, planned once
    same_model(single, alone)
    bad = subprocess.run(
        [sys.executable, "-m", "freelunch_cli", "prune", "--work", str(alone.root), "--stats", "sparse", "--shard", "1/2"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--stats sparse" in bad.stderr and "cannot be sharded" in bad.stderr and "Traceback" not in bad.stderr
    from freelunch_cli.core.errors import FreelunchError

    with pytest.raises(FreelunchError, match="--prepare --force"):
        prune(alone, PruneConfig(criterion="wanda", shard="0/2"), force=True)
    prepared = prune(alone, PruneConfig(criterion="magnitude", device="cpu", prepare=True), force=True)
    assert prepared["prepared"] and alone.stage("prune").status == "running" and not alone.prune_report_path.exists()
    done = prune(alone, PruneConfig(criterion="magnitude", device="cpu", shard="1/2"))
    assert done["ran_here"] == [1, 3, 0, 2] and alone.stage("prune").status == "done"

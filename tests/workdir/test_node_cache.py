"""A --cache-dir template ($VAR) gives every node a cache of its own: a worker whose folder lacks the dense
activations recomputes them, and the first node's copy stays good."""

import os
import subprocess
import sys

import pytest
import torch

from freelunch_cli.core.console import Reporter
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.engine.boundaries import restore_dense_boundaries
from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct
from freelunch_cli.workdir import manifest
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import load_tensors

from helpers import CALIB, make_tiny_model

CFG = ReconstructConfig(window="block", lr=1e-3, epochs=1, device="cpu", keep_cache=True)


def test_a_cache_dir_template_is_expanded_per_node(tmp_path, monkeypatch):
    model = make_tiny_model(tmp_path / "model", "llama")
    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    node_b.mkdir()
    monkeypatch.setenv("FL_NODE_SCRATCH", str(node_a))
    work = WorkDir(tmp_path / "work")
    cal = CalibrateConfig(model=str(model), data=str(CALIB), samples=8, seqlen=32, device="cpu", cache_dir="$FL_NODE_SCRATCH")
    calibrate(work, cal)
    template = work.manifest()["cache_dir"]
    assert template.startswith("$FL_NODE_SCRATCH/freelunch-work-")  # stored as written, not node A's path
    on_a = {p.name: p.read_bytes() for p in node_a.glob("freelunch-work-*/dense/boundary_*.safetensors")}
    assert len(on_a) == 3
    monkeypatch.setenv("FL_NODE_SCRATCH", str(tmp_path / "node-c"))  # SparseGPT reads every block's dense input
    prune(WorkDir(work.root), PruneConfig(criterion="sparsegpt", device="cpu"))
    on_c = {p.name: p.read_bytes() for p in tmp_path.glob("node-c/freelunch-work-*/dense/boundary_*.safetensors")}
    assert on_c == {k: v for k, v in on_a.items() if k != "boundary_002.safetensors"}  # each block's input: 0 and 1
    monkeypatch.setenv("FL_NODE_SCRATCH", str(node_a))
    subprocess.run(["cp", "-a", str(work.root), str(tmp_path / "ref")], check=True)
    ref = WorkDir(tmp_path / "ref")
    reconstruct(ref, CFG)  # on node A, from its cache

    # two workers on another node (an empty scratch folder) at once: one recomputes, the other waits for it
    env = {**os.environ, "FL_NODE_SCRATCH": str(node_b)}
    args = ["--window", "block", "--lr", "1e-3", "--epochs", "1", "--device", "cpu", "--keep-cache"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "freelunch_cli", "reconstruct", "--work", str(work.root), *args, "--shard", f"{i}/2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("recomputing 3 dense activation file(s) missing" in err for _, err in outs) == 1, outs
    monkeypatch.setenv("FL_NODE_SCRATCH", str(node_b))
    on_b = WorkDir(work.root)
    assert on_b.stage("reconstruct").status == "done" and on_b.stage("calibrate").status == "done"
    assert on_b.manifest()["cache_dir"] == template
    assert {p.name: p.read_bytes() for p in node_b.glob("freelunch-work-*/dense/boundary_*.safetensors")} == on_a
    for i in range(2):
        x, y = load_tensors(ref.block_path("reconstructed", i)), load_tensors(on_b.block_path("reconstructed", i))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    monkeypatch.setenv("FL_NODE_SCRATCH", str(node_a))  # back on node A, in a fresh process: its copy is still good
    manifest.VERIFIED.clear()  # as in a new process
    again = WorkDir(work.root)
    b0 = again.boundary_path("dense", 0)
    assert b0.is_relative_to(node_a) and again.manifest()["files"][again.rel(b0)]["mtime_ns"] != b0.stat().st_mtime_ns
    assert all(again.problem(again.boundary_path("dense", b)) is None for b in range(3))  # checked by size per node
    b1 = again.boundary_path("dense", 1)
    b1.write_bytes(on_a["boundary_001.safetensors"][:100])  # truncated on this node: recomputed, not refused
    restore_dense_boundaries(again, {1}, "cpu", Reporter(quiet=True))
    assert b1.read_bytes() == on_a["boundary_001.safetensors"]

    monkeypatch.delenv("FL_NODE_SCRATCH")  # a process without the variable
    with pytest.raises(FreelunchError, match=r"names \$FL_NODE_SCRATCH, which is not set") as e:
        reconstruct(WorkDir(work.root), CFG, force=True)
    assert "\n" not in str(e.value)
    assert WorkDir(work.root).stage("reconstruct").status == "done"  # refused before anything was discarded

    monkeypatch.setenv("FL_NODE_SCRATCH", str(node_a))  # a new calibration takes a new folder: no node reads old copies
    calibrate(WorkDir(work.root), cal, force=True)
    fresh = WorkDir(work.root).manifest()["cache_dir"]
    assert fresh != template and fresh.startswith("$FL_NODE_SCRATCH/freelunch-work-")

"""Kills, Ctrl-C, damaged files and concurrent runs never lose work or give a different model."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
from freelunch_cli.stages.export import ExportConfig, export
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import load_tensors, read_json
from freelunch_cli.workdir.locks import stage_lock

from helpers import CALIB, SAMPLES, SEQLEN


def cli(*args, kill_at=None):
    env = {**os.environ, "FREELUNCH_KILL_AT": kill_at} if kill_at else dict(os.environ)
    env.pop("FREELUNCH_KILL_AT", None) if not kill_at else None
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps that: restore the default
    return subprocess.run(
        [sys.executable, "-m", "freelunch_cli", *args, "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def same_files(a, b):
    for f in sorted(os.listdir(a)):
        if f.endswith(".safetensors"):
            ta, tb = load_tensors(os.path.join(a, f)), load_tensors(os.path.join(b, f))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f


def test_sigkill_at_every_stage_then_resume_gives_the_same_model(tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    cal = ["--model", model, "--data", str(CALIB), "--samples", str(SAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu"]
    pr = ["--criterion", "sparsegpt", "--sparsity", "0.5", "--device", "cpu"]
    rc = ["--window", "block", "--inputs", "sparse", "--lr", "1e-3", "--epochs", "2", "--device", "cpu"]
    # the uninterrupted reference, in process
    ref = WorkDir(tmp_path / "ref")
    calibrate(ref, CalibrateConfig(model=model, data=str(CALIB), samples=SAMPLES, seqlen=SEQLEN, device="cpu"))
    prune(ref, PruneConfig(criterion="sparsegpt", sparsity=0.5, device="cpu"))
    reconstruct(ref, ReconstructConfig(window="block", inputs="sparse", lr=1e-3, epochs=2, device="cpu"))
    export(ref, ExportConfig(out=str(tmp_path / "ref-hf"), max_shard_size="60KB"))
    # the same pipeline, killed once inside every stage
    w = str(tmp_path / "w")
    steps = [
        (["calibrate", *cal, "--work", w], "calibrate.boundary:2"),
        (["prune", *pr, "--work", w], "prune.block:1"),
        (["reconstruct", *rc, "--work", w], "reconstruct.window:1"),
        (["export", "--work", w, "--out", str(tmp_path / "hf"), "--max-shard-size", "60KB"], "export.shard:2"),
    ]
    for args, point in steps:
        killed = cli(*args, kill_at=point)
        assert killed.returncode == -9, (point, killed.stderr)
        resumed = cli(*args, "--resume")
        assert resumed.returncode == 0, (point, resumed.stderr)
    work = WorkDir(w)
    same_files(ref.model_dir("dense"), work.model_dir("dense"))
    same_files(ref.root / "acts" / "dense", work.root / "acts" / "dense")
    same_files(ref.model_dir("pruned"), work.model_dir("pruned"))
    same_files(ref.model_dir("reconstructed"), work.model_dir("reconstructed"))
    same_files(tmp_path / "ref-hf", tmp_path / "hf")


@pytest.mark.parametrize("sig, code", [("INT", 130), ("TERM", 143)])
def test_ctrl_c_and_sigterm_stop_cleanly_and_resume(sig, code, fresh_work):
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", device="cpu"))
    args = ["reconstruct", "--work", str(work.root), "--device", "cpu"]
    stopped = cli(*args, kill_at=f"reconstruct.window:1:{sig}")
    assert stopped.returncode == code, stopped.stderr
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    assert read_json(work.window_record_path(0))["status"] == "done" and not work.window_record_path(1).exists()
    assert work.stage("reconstruct").status == "running"
    assert cli(*args, "--resume").returncode == 0
    assert work.stage("reconstruct").status == "done"


def test_damaged_files_are_named_and_recomputed(fresh_work):
    work = fresh_work("llama")
    twin = fresh_work("llama")
    prune(twin, PruneConfig(criterion="wanda", stats="sparse", device="cpu"))
    # a truncated dense activation cache
    victim = work.boundary_path("dense", 0)
    others = {p: p.stat().st_mtime_ns for p in (work.root / "acts" / "dense").iterdir() if p != victim}
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(FreelunchError, match="boundary_000.safetensors is damaged .*calibrate --work .* --resume"):
        prune(work, PruneConfig(criterion="wanda", stats="sparse", device="cpu"))
    cfg = CalibrateConfig(**work.stage("calibrate").summary["config"])
    with pytest.raises(FreelunchError, match="missing or damaged .*boundary_000.*--resume"):
        calibrate(work, cfg)
    calibrate(work, cfg, resume=True)
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())  # only the damaged file was recomputed
    prune(work, PruneConfig(criterion="wanda", stats="sparse", device="cpu"), resume=True)  # the failed prune is continued
    same_files(twin.model_dir("pruned"), work.model_dir("pruned"))
    # an altered (same size) pruned shard
    shard = work.block_path("pruned", 0)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(FreelunchError, match="block_000.safetensors is damaged .*altered.*prune --work"):
        reconstruct(work, ReconstructConfig(device="cpu"))
    prune(work, PruneConfig(criterion="wanda", stats="sparse", device="cpu"), resume=True)
    same_files(twin.model_dir("pruned"), work.model_dir("pruned"))


def test_a_different_configuration_is_refused_by_name(fresh_work):
    work = fresh_work("llama")
    cfg = CalibrateConfig(**work.stage("calibrate").summary["config"])
    cfg.seed = 7
    with pytest.raises(FreelunchError, match=r"another run \(seed: 0 then, 7 now\)"):
        calibrate(work, cfg)
    prune(work, PruneConfig(criterion="wanda", device="cpu"))
    reconstruct(work, ReconstructConfig(device="cpu"))
    with pytest.raises(FreelunchError, match="criterion: 'wanda' then, 'magnitude' now"):
        prune(work, PruneConfig(criterion="magnitude", device="cpu"))
    prune(work, PruneConfig(criterion="magnitude", device="cpu"), force=True)
    assert work.stage("reconstruct") is None and not work.model_dir("reconstructed").exists()  # later stages discarded
    assert work.stage("calibrate").status == "done"  # earlier stages kept


def test_a_second_process_on_the_same_stage_is_refused(fresh_work):
    work = fresh_work("llama")
    with stage_lock(work, "prune"):
        other = cli("prune", "--work", str(work.root), "--device", "cpu")
    assert other.returncode == 2
    assert "already running" in other.stderr and f"pid {os.getpid()}" in other.stderr
    assert cli("prune", "--work", str(work.root), "--device", "cpu").returncode == 0


def test_force_checks_every_input_before_discarding_anything(fresh_work):
    """After reconstruct evicted the dense activations it no longer needed, `prune --force` recomputes the ones it reads
    before it discards anything; an input it cannot recompute stops it before the pruned and reconstructed models go."""
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="wanda", sparsity=0.5, device="cpu"))
    reconstruct(work, ReconstructConfig(window="block", epochs=1, device="cpu"))
    assert not work.boundary_path("dense", 0).exists() and work.is_evicted(work.boundary_path("dense", 0))
    tokens = work.tokens_path.read_bytes()
    work.tokens_path.unlink()  # what recomputing the embeddings' boundary needs
    before = {p: p.read_bytes() for p in sorted(work.root.rglob("*")) if p.is_file()}
    with pytest.raises(FreelunchError, match="tokens.safetensors is missing; rerun `freelunch calibrate --work .* --resume`"):
        prune(work, PruneConfig(criterion="wanda", sparsity=0.6, stats="sparse", device="cpu"), force=True)
    assert {p: p.read_bytes() for p in sorted(work.root.rglob("*")) if p.is_file()} == before
    work.tokens_path.write_bytes(tokens)
    # a windowed stage recomputes the dense activations it needs before it discards anything
    pruned = {p.name: p.read_bytes() for p in work.model_dir("pruned").iterdir()}
    reconstruct(work, ReconstructConfig(window="block", lr=3e-3, device="cpu"), force=True)
    assert work.stage("reconstruct").signature["lr"] == 3e-3
    assert {p.name: p.read_bytes() for p in work.model_dir("pruned").iterdir()} == pruned
    prune(work, PruneConfig(criterion="wanda", sparsity=0.6, stats="sparse", device="cpu"), force=True)
    assert work.stage("reconstruct") is None and work.stage("prune").signature["sparsity"] == 0.6


def test_dense_statistics_need_no_activation_cache(fresh_work):
    """Calibrate keeps the dense input norms of every matrix: Wanda with dense statistics (the default) runs without
    the cache, even after reconstruct deleted it, and gives the masks a pass over the cache gives."""
    work, twin = fresh_work("llama"), fresh_work("llama")
    for path in (work.root / "acts" / "dense").iterdir():
        path.unlink()
    prune(work, PruneConfig(criterion="wanda", device="cpu"))
    for i in range(2):
        twin.forget_file(twin.input_stats_path(i))  # without stored statistics: a pass over the cache
    prune(twin, PruneConfig(criterion="wanda", device="cpu"))
    for i in range(2):
        assert load_tensors(work.mask_path(i)).keys() == load_tensors(twin.mask_path(i)).keys()
        for name, keep in load_tensors(work.mask_path(i)).items():
            assert torch.equal(keep, load_tensors(twin.mask_path(i))[name]), name


def test_a_full_disk_while_a_library_writes_leaves_no_partial_file_and_names_the_file(tmp_path):
    """The tokenizers library writes tokenizer.json itself and reports a full disk as a plain Exception."""
    from freelunch_cli.workdir.files import save_pretrained_atomic

    class Tokenizer:
        def save_pretrained(self, folder):
            (folder / "tokenizer_config.json").write_text("{}")
            (folder / "tokenizer.json").write_text('{"trunc')
            raise Exception("No space left on device (os error 28)")

    folder = tmp_path / "dense"
    with pytest.raises(OSError) as e:
        save_pretrained_atomic(Tokenizer(), folder)
    assert e.value.errno == 28 and e.value.filename == str(folder / "tokenizer.json")
    assert list(folder.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["dense"]


def test_the_free_space_check_counts_the_model_and_the_cache(tiny_models, tmp_path, monkeypatch):
    import shutil as sh

    import freelunch_cli.workdir.files as files

    work = WorkDir(tmp_path / "w")
    cfg = CalibrateConfig(model=str(tiny_models["llama"]), data=str(CALIB), samples=SAMPLES, seqlen=SEQLEN, device="cpu")
    cache = 3 * SAMPLES * SEQLEN * 64 * 2  # three boundaries in float16: the cache alone fits
    real = sh.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=cache + 1000))
    with pytest.raises(
        FreelunchError, match=r"not enough disk for the activation cache: it needs .* \(with the model's shards\)"
    ):
        calibrate(work, cfg)
    assert not work.root.exists()


def test_float16_overflow_is_an_error_naming_where_not_a_nan_cache(tmp_path):
    from safetensors.torch import load_file, save_file

    from helpers import make_tiny_model

    folder = make_tiny_model(tmp_path / "m", "llama")
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.mlp.down_proj.weight"] *= 1e7  # block 0's output beyond float16's 65504
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    work = WorkDir(tmp_path / "w")
    with pytest.raises(
        FreelunchError, match=r"the output of dense block 0 \(in float16\) holds NaN or infinite values .*bfloat16 or float32"
    ):
        calibrate(
            work, CalibrateConfig(model=str(folder), data=str(CALIB), samples=4, seqlen=SEQLEN, dtype="float16", device="cpu")
        )
    assert not work.is_recorded(work.boundary_path("dense", 1)) and not work.boundary_path("dense", 1).exists()


def test_files_this_process_wrote_are_not_hashed_again_and_a_resume_checks_sizes_and_times(fresh_work, monkeypatch):
    import freelunch_cli.workdir.integrity as integrity
    from freelunch_cli.stages.verify import verify
    from freelunch_cli.workdir import manifest

    work = fresh_work("llama")
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p) or real(p))
    prune(work, PruneConfig(criterion="magnitude", device="cpu"))
    reconstruct(work, ReconstructConfig(window="block", epochs=1, device="cpu"))
    assert hashed == []  # what it wrote is known good; what calibrate wrote has its recorded size and time
    assert all("mtime_ns" in rec for rec in work.manifest()["files"].values())
    # a same-size alteration that keeps the modification time: stages trust it, `freelunch verify` does not
    shard = work.block_path("pruned", 1)
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    manifest.VERIFIED.clear()  # as in a new process
    assert work.problem(shard) is None
    with pytest.raises(
        FreelunchError, match=r"1 of \d+ files are missing or damaged \(pruned/block_001.safetensors\); `freelunch prune"
    ):
        verify(work)
    monkeypatch.setenv("FREELUNCH_VERIFY", "full")
    assert "do not match the hash" in work.problem(shard)


def test_a_calibration_from_before_the_statistics_resumes_without_recomputing_every_block(fresh_work):
    """A work directory calibrated before calibrate kept statistics: a damaged boundary is recomputed alone, and
    prune computes the statistics from the cache as before."""
    work = fresh_work("llama")
    work.forget([work.rel(work.input_stats_path(i)) for i in range(2)])
    others = {p: p.stat().st_mtime_ns for p in (work.root / "acts" / "dense").iterdir() if p.name != "boundary_001.safetensors"}
    victim = work.boundary_path("dense", 1)
    victim.write_bytes(victim.read_bytes()[:1000])
    calibrate(work, CalibrateConfig(**work.stage("calibrate").summary["config"]), resume=True)
    assert all(p.stat().st_mtime_ns == t for p, t in others.items()) and work.problem(victim) is None
    assert not any(work.input_stats_path(i).exists() for i in range(2))
    prune(work, PruneConfig(criterion="wanda", device="cpu"))
    assert work.stage("prune").status == "done"

"""The engine's promises: a model is exactly its stage's files, reruns after a whole pipeline are safe and recompute
nothing, a stage discards only what was built from it, evicted files are not damage, locks are checked, and claim
ages never compare two machines' clocks."""

import os
import time

import pytest

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.engine.claims import Claims
from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
from freelunch_cli.stages.evaluate import EvalConfig, evaluate
from freelunch_cli.stages.export import ExportConfig, export
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.quantize import QuantizeConfig, quantize
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct
from freelunch_cli.stages.retrain import RetrainConfig, retrain
from freelunch_cli.stages.verify import verify
from freelunch_cli.workdir import locks
from freelunch_cli.workdir.dependencies import dependents
from freelunch_cli.workdir.directory import EVICTED, WorkDir

from helpers import CALIB, HELDOUT, SAMPLES, SEQLEN

RECON = ReconstructConfig(epochs=1, device="cpu")
EVAL = EvalConfig(ppl=[str(HELDOUT)], seqlen=32, limit_sequences=2, device="cpu")


def _snapshot(work: WorkDir) -> dict:
    """Every recorded file's record and every stage's record: what a rerun that recomputes nothing leaves as it was."""
    m = work.manifest()
    return {"files": m["files"], "stages": {k: (v["status"], v["run_id"], v.get("finished")) for k, v in m["stages"].items()}}


def test_a_missing_block_is_an_error_in_every_reader_never_another_stages_block(fresh_work, tmp_path):
    work = fresh_work("llama")
    prune(work, PruneConfig(device="cpu"))
    reconstruct(work, RECON)
    gone = work.block_path("reconstructed", 1)
    gone.unlink()
    named = r"recon/block_001.safetensors is missing; rerun `freelunch reconstruct --work .* --resume`"
    with pytest.raises(FreelunchError, match=named):
        export(work, ExportConfig(out=str(tmp_path / "hf"), stage="reconstructed"))
    with pytest.raises(FreelunchError, match=named):
        evaluate(work, EVAL)
    with pytest.raises(FreelunchError, match=named):
        quantize(work, QuantizeConfig(start="reconstructed", steps=0, group_size=16, device="cpu"))
    with pytest.raises(FreelunchError, match=named):
        retrain(work, RetrainConfig(start="reconstructed", steps=1, device="cpu"))
    assert work.stage("quantize") is None and work.stage("retrain") is None  # refused before they began
    reconstruct(work, RECON, resume=True)  # recomputes the block, as the message says
    out = export(work, ExportConfig(out=str(tmp_path / "hf2"), stage="reconstructed"))
    assert out["stage"] == "reconstructed" and gone.exists()


def test_every_stage_rerun_after_the_whole_pipeline_succeeds_and_recomputes_nothing(tiny_models, tmp_path):
    work = WorkDir(tmp_path / "work")
    steps = [
        lambda **kw: calibrate(
            work, CalibrateConfig(model=str(tiny_models["llama"]), data=str(CALIB), samples=SAMPLES, seqlen=SEQLEN), **kw
        ),
        lambda **kw: prune(work, PruneConfig(device="cpu"), **kw),
        lambda **kw: reconstruct(work, RECON, **kw),  # evicts the dense activations it no longer needs
        lambda **kw: retrain(work, RetrainConfig(steps=2, device="cpu"), **kw),
        lambda **kw: quantize(work, QuantizeConfig(steps=0, group_size=16, device="cpu"), **kw),
        lambda **kw: evaluate(work, EVAL),
        lambda **kw: export(work, ExportConfig(out=str(tmp_path / "hf")), **kw),
    ]
    first = [step() for step in steps]
    evicted = [rel for rel, rec in work.manifest()["files"].items() if rec.get("evicted")]
    assert evicted and all(work.problem(work.path_of(rel)) == EVICTED for rel in evicted)
    assert not work.damaged_files("calibrate")
    before = _snapshot(work)
    shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "hf").glob("*.safetensors")}
    for resume in (False, True):  # a pipeline script rerun as it is, or with --resume everywhere
        again = [step(resume=resume) if i < 5 else step() for i, step in enumerate(steps)]
        assert _snapshot(work) == before  # no file written or deleted, no stage restarted
        assert [a.get("seconds") for a in again[:5]] == [f.get("seconds") for f in first[:5]]  # the recorded summaries
        assert again[5]["results"][0]["ppl"] == first[5]["results"][0]["ppl"]
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "hf").glob("*.safetensors")} == shards
    assert verify(work)["evicted"] == evicted  # evicted on purpose is not damage
    with pytest.raises(FreelunchError, match="exists and is not empty"):  # other options still need --force
        export(work, ExportConfig(out=str(tmp_path / "hf"), dtype="float16"))


def test_a_first_retrain_after_quantize_keeps_the_quantized_model(fresh_work):
    work = fresh_work("llama")
    prune(work, PruneConfig(device="cpu"))
    quantize(work, QuantizeConfig(steps=0, group_size=16, device="cpu"))
    quantized = {i: work.block_path("quantized", i).read_bytes() for i in range(2)}
    retrain(work, RetrainConfig(steps=1, device="cpu"))  # from the pruned model; quantize never read a retraining
    assert work.stage("quantize").status == "done" and work.stage("retrain").status == "done"
    assert {i: work.block_path("quantized", i).read_bytes() for i in range(2)} == quantized
    assert evaluate(work, EvalConfig(ppl=[str(HELDOUT)], stage="quantized", seqlen=32, limit_sequences=1, device="cpu"))
    # redoing prune discards exactly what was built from the pruned model
    prune(work, PruneConfig(sparsity=0.6, device="cpu"), force=True)
    assert work.stage("quantize") is None and work.stage("retrain") is None and not work.model_dir("quantized").exists()


def test_dependents_follow_what_each_stage_read():
    stages = {
        "calibrate": {"signature": {}},
        "prune": {"signature": {}},
        "reconstruct": {"signature": {}},
        "retrain": {"signature": {"from": "dense"}},
        "quantize": {"signature": {"from": "retrained"}},
    }
    assert dependents(stages, "prune") == ["reconstruct"]
    assert dependents(stages, "retrain") == ["quantize"]
    assert dependents(stages, "calibrate") == ["prune", "reconstruct", "retrain", "quantize"]
    stages["retrain"]["signature"]["from"] = "reconstructed"
    assert dependents(stages, "prune") == ["reconstruct", "retrain", "quantize"]
    assert dependents(stages, "quantize") == []


def test_export_to_the_same_folder_with_the_same_options_is_a_no_op_unless_a_shard_changed(fresh_work, tmp_path):
    work = fresh_work("llama")
    cfg = ExportConfig(out=str(tmp_path / "hf"), stage="dense")
    first = export(work, cfg)
    shard = tmp_path / "hf" / "model.safetensors"
    mtime = shard.stat().st_mtime_ns
    assert export(work, cfg) == first and shard.stat().st_mtime_ns == mtime
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0xFF  # a same-size alteration: the hash tells, so the folder is no finished export any more
    shard.write_bytes(bytes(data))
    with pytest.raises(FreelunchError, match="exists and is not empty"):
        export(work, cfg)


def test_stages_refuse_a_filesystem_whose_locks_do_not_work(fresh_work, monkeypatch):
    work = fresh_work("llama")
    monkeypatch.setattr(locks, "_CHECKED", set())
    monkeypatch.setattr(locks.fcntl, "flock", lambda f, op: None)  # granted to everyone: no lock at all
    with pytest.raises(FreelunchError, match=r"file locks do not work in .*-o flock"):
        prune(work, PruneConfig(device="cpu"))

    def no_locks(f, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    with pytest.raises(FreelunchError, match=r"file locks do not work in .*No locks available.*-o flock"):
        prune(work, PruneConfig(device="cpu"))


def test_claim_ages_use_the_file_servers_clock_on_both_sides(tmp_path, monkeypatch):
    first, second = Claims(tmp_path, stale_after=30), Claims(tmp_path, stale_after=30)
    assert first.try_claim(0) == 1
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this machine's clock an hour ahead of the server's
    assert second.is_live(0) and second.try_claim(0) is None
    old = tmp_path / "000.claim.1"
    os.utime(old, (real() - 60, real() - 60))  # its owner made no progress for a minute, by the server's clock
    assert second.try_claim(0) == 2 and not first.held(0, 1).holds()


def test_evicted_dense_activations_are_recomputed_bit_for_bit_by_a_later_stage(fresh_work):
    work = fresh_work("llama")
    kept = {b: work.boundary_path("dense", b).read_bytes() for b in range(3)}
    prune(work, PruneConfig(device="cpu"))
    reconstruct(work, RECON)
    assert all(work.is_evicted(work.boundary_path("dense", b)) for b in range(3))
    quantize(work, QuantizeConfig(start="pruned", steps=1, group_size=16, keep_cache=True, device="cpu"))
    assert {b: work.boundary_path("dense", b).read_bytes() for b in range(3)} == kept
    assert all(work.problem(work.boundary_path("dense", b)) is None for b in range(3))


def test_submodule_windows_plan_and_rerun_after_their_inputs_were_evicted(fresh_work):
    work = fresh_work("llama")
    prune(work, PruneConfig(device="cpu"))
    cfg = ReconstructConfig(window="submodule", epochs=1, device="cpu")
    first = reconstruct(work, cfg)
    assert work.is_evicted(work.boundary_path("dense", 0))  # what planning submodule windows used to read
    assert reconstruct(work, cfg) == first  # the same options again: done, nothing recomputed
    out = quantize(work, QuantizeConfig(window="submodule", steps=0, group_size=16, device="cpu"))
    assert out["windows"] == 4


def test_calibrate_resumes_a_damaged_shard_after_later_stages_evicted_its_cache(fresh_work):
    work = fresh_work("llama")
    prune(work, PruneConfig(device="cpu"))
    reconstruct(work, RECON)
    shard = work.block_path("dense", 1)
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cfg = CalibrateConfig(**work.stage("calibrate").summary["config"])
    with pytest.raises(FreelunchError, match="dense/block_001.safetensors"):
        calibrate(work, cfg)
    calibrate(work, cfg, resume=True)  # recomputes the shard; the evicted activations stay evicted
    assert work.problem(shard) is None and work.is_evicted(work.boundary_path("dense", 1))


def test_a_lost_block_of_a_chained_reconstruction_is_rebuilt_bit_for_bit(fresh_work):
    """--inputs sparse: the windows' parameter files and the chained stream are gone once the model is assembled; a
    lost block is rebuilt by replaying the windows before it from their assembled blocks, to the same bits."""
    work = fresh_work("llama")
    prune(work, PruneConfig(device="cpu"))
    cfg = ReconstructConfig(window="block", inputs="sparse", epochs=1, device="cpu", dtype="float32")
    reconstruct(work, cfg)
    lost = work.block_path("reconstructed", 1)
    want = lost.read_bytes()
    lost.unlink()
    reconstruct(work, cfg, resume=True)
    assert lost.read_bytes() == want
    assert reconstruct(work, cfg)["windows"] == 2 and not work.damaged_files("reconstruct")

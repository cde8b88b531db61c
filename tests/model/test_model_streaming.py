"""The streamed model (one block at a time from shards) computes exactly what transformers computes."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from freelunch_cli.evaluation.perplexity import perplexity, split_sequences
from freelunch_cli.model.skeleton import Skeleton
from freelunch_cli.workdir.files import TensorRows, load_tensors

from helpers import ARCHS, MORE_ARCHS, SEQLEN, streamed_logits


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_boundaries_match_transformers_hidden_states(arch, tiny_models, calibrated):
    work = calibrated[arch]
    ids = load_tensors(work.tokens_path)["input_ids"][:4]
    ref = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    n = ref.config.num_hidden_layers
    for b in range(n):  # hidden_states[n] has the final norm applied by transformers; compare the rest
        cached = TensorRows(work.boundary_path("dense", b)).rows(0, 4).float()
        torch.testing.assert_close(cached, out.hidden_states[b], atol=2e-3, rtol=2e-3)
    # the last boundary, through the model's own final norm and head, gives its logits
    sk = Skeleton.from_work(work, "dense", "cpu", torch.float32)
    last = TensorRows(work.boundary_path("dense", n)).rows(0, 4).float()
    torch.testing.assert_close(sk.logits(last), out.logits, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("arch", ARCHS + MORE_ARCHS)
def test_block_by_block_forward_is_exact(arch, tiny_models, calibrated, request):
    """Experts split into linear layers, eager attention for Gemma2, sandwich norms: the same logits as the model."""
    work = (calibrated if arch in calibrated else request.getfixturevalue("more_calibrated"))[arch]
    ids = load_tensors(work.tokens_path)["input_ids"][:3]
    ref = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, streamed_logits(work, "dense", ids), atol=1e-5, rtol=1e-5)


def test_perplexity_matches_a_direct_computation(tiny_models, calibrated):
    work = calibrated["llama"]
    ids = load_tensors(work.tokens_path)["input_ids"].flatten()
    windows = split_sequences(ids, SEQLEN, limit=6)
    sk = Skeleton.from_work(work, "dense", "cpu", torch.float32)
    res = perplexity(sk, windows, batch_size=4, memory_budget=1)  # tiny budget: several chunks
    ref = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [ref(w[None], labels=w[None]).loss for w in windows]  # mean NLL over L-1 tokens
    expected = torch.exp(torch.stack(losses).mean())
    assert res["tokens"] == 6 * (SEQLEN - 1)
    assert res["ppl"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])  # streamed, or loaded whole by transformers
def test_a_weight_missing_from_the_checkpoint_is_refused_by_name(tmp_path, layout):
    """An untied checkpoint without ``lm_head.weight`` would get a random head; a tied one needs none."""
    from safetensors.torch import load_file

    from freelunch_cli.core.errors import FreelunchError
    from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
    from freelunch_cli.workdir.directory import WorkDir

    from helpers import CALIB, make_tiny_model

    folder = make_tiny_model(tmp_path / "m", "llama")  # tie_word_embeddings false
    state = load_file(folder / "model.safetensors")
    del state["lm_head.weight"]
    (folder / "model.safetensors").unlink()
    if layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = CalibrateConfig(model=str(folder), data=str(CALIB), samples=4, seqlen=32, device="cpu")
    with pytest.raises(FreelunchError, match=r"has no lm_head\.weight, which the model needs \(the config does not tie"):
        calibrate(WorkDir(tmp_path / "w"), cfg)
    assert not (tmp_path / "w" / "dense" / "rest.safetensors").exists()

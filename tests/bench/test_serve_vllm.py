"""bench/serve_vllm.py without vLLM: its perplexity from prompt log-probabilities, against an independent computation."""

import json
import math
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import serve_vllm  # noqa: E402


def fake_vllm(logprob_of):
    """A `vllm` module whose LLM returns, for each prompt, ``logprob_of(position, token)`` as its prompt log-probabilities
    (None at position 0, as vLLM does) and 3 generated tokens."""
    mod = types.ModuleType("vllm")
    mod.__version__ = "test"

    class SamplingParams:
        def __init__(self, prompt_logprobs=None, **kw):
            self.prompt_logprobs = prompt_logprobs

    class LLM:
        def __init__(self, **kw):
            self.kw = kw

        def generate(self, prompts, sp, use_tqdm=True):
            outs = []
            for p in prompts:
                ids = p["prompt_token_ids"]
                lps = None
                if sp.prompt_logprobs is not None:
                    lps = [None] + [{t: types.SimpleNamespace(logprob=logprob_of(i, t))} for i, t in enumerate(ids) if i]
                outs.append(types.SimpleNamespace(prompt_logprobs=lps, outputs=[types.SimpleNamespace(token_ids=[1, 2, 3])]))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    mod.inputs = inputs
    return mod, inputs


def test_perplexity_is_the_mean_nll_of_every_token_but_each_sequences_first(tmp_path, monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(serve_vllm.SEQLEN, 50, dtype=torch.float64)
    logp = torch.log_softmax(logits, -1)  # position i predicts token i from the tokens before it
    seqs = torch.randint(0, 50, (3, serve_vllm.SEQLEN))
    mod, inputs = fake_vllm(lambda i, t: float(logp[i, t]))
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    ids, out = tmp_path / "ids.json", tmp_path / "out.json"
    ids.write_text(json.dumps(seqs.tolist()))
    serve_vllm.measure(tmp_path, ids, out)
    r = json.loads(out.read_text())
    # independently: cross-entropy of the same log-probabilities over positions 1..SEQLEN-1 of every sequence
    nll = sum(float(torch.nn.functional.nll_loss(logp[1:], s[1:], reduction="sum")) for s in seqs)
    tokens = 3 * (serve_vllm.SEQLEN - 1)
    assert r["tokens"] == tokens
    assert math.isclose(r["ppl"], math.exp(nll / tokens), rel_tol=1e-9)
    assert set(r["decode_tok_s"]) == {"batch1", "batch8"} and r["decode_tok_s"]["batch1"] > 0


def test_a_refused_export_is_reported_by_its_root_cause_not_the_engines_last_line():
    log = "\n".join(
        [
            "INFO 12-06 03:44:50 [config.py:1] loading",
            "(Worker pid=9249) ERROR 12-06 03:44:58 [multiproc_executor.py:953] Traceback (most recent call last):",
            "(Worker pid=9249) ERROR 12-06 03:44:58 [multiproc_executor.py:953] ValueError: Failed to find a kernel "
            "that can implement the WNA16 linear layer. Reasons: ",
            "(Worker pid=9249) ERROR 12-06 03:44:58 [multiproc_executor.py:953]  CPUWNA16LinearKernel cannot implement "
            "due to: Quant type (uint8b128) not supported by CPUWNA16",
            "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}",
        ]
    )
    msg = serve_vllm.root_cause(log)
    assert msg.startswith("ValueError: Failed to find a kernel") and "uint8b128" in msg and "Engine core" not in msg
    assert "\n" not in msg and "pid=" not in msg
    assert serve_vllm.root_cause("warming up\nKilled\n") == "Killed"  # no exception: the last line

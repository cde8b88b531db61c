"""Shared test helpers: tiny random causal LMs (2 blocks, hidden 64) with a real tokenizer, saved as Hugging Face
folders; the data files; the calibration size every fixture uses; streamed logits of a work directory's model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, PreTrainedTokenizerFast, Qwen2Config

ARCHS = ["llama", "qwen2", "mistral", "opt"]
MORE_ARCHS = ["mixtral", "qwen2_moe", "gemma2", "gemma3", "phi3"]  # mixture of experts, sandwich norms, fused projections
SAMPLES, SEQLEN = 16, 48  # the calibration of every fixture's work directory
# ../shared/data beside the checkout, or FREELUNCH_TEST_DATA where it is elsewhere (bench/gpu_check.sh on a GPU machine)
DATA = Path(os.environ.get("FREELUNCH_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
CALIB = DATA / "wikitext-2-raw" / "calib.txt"
HELDOUT = DATA / "wikitext-2-raw" / "heldout.txt"
VOCAB = 384


def tiny_config(arch: str, layers: int = 2, hidden: int = 64, **overrides):
    config = _tiny_config(arch, layers, hidden)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _tiny_config(arch: str, layers: int, hidden: int):
    common = dict(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256
    )
    if arch == "llama":
        return LlamaConfig(intermediate_size=2 * hidden, num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(intermediate_size=2 * hidden, num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "mistral":
        return MistralConfig(intermediate_size=2 * hidden, num_key_value_heads=2, sliding_window=24, **common)
    if arch == "opt":
        return OPTConfig(ffn_dim=2 * hidden, word_embed_proj_dim=hidden, dropout=0.1, **common)
    if arch == "mixtral":  # 4 experts, 2 per token, fused as 3-D tensors
        return transformers.MixtralConfig(
            intermediate_size=2 * hidden, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common
        )
    if arch == "qwen2_moe":  # routed experts and a shared expert with its gate
        return transformers.Qwen2MoeConfig(
            intermediate_size=2 * hidden,
            moe_intermediate_size=hidden,
            shared_expert_intermediate_size=2 * hidden,
            num_experts=4,
            num_experts_per_tok=2,
            num_key_value_heads=2,
            decoder_sparse_step=1,
            **common,
        )
    if arch in ("gemma2", "gemma3"):  # norms before and after each submodule
        cls = transformers.Gemma2Config if arch == "gemma2" else transformers.Gemma3TextConfig
        return cls(intermediate_size=2 * hidden, num_key_value_heads=2, head_dim=16, sliding_window=24, **common)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return transformers.Phi3Config(intermediate_size=2 * hidden, num_key_value_heads=2, pad_token_id=0, **common)
    raise ValueError(arch)


def train_tokenizer(text: str, eos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator([text], trainer)
    return (
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>") if eos else PreTrainedTokenizerFast(tokenizer_object=tok)
    )


def make_tiny_model(
    folder: Path, arch: str = "llama", seed: int = 0, layers: int = 2, text: str | None = None, eos: bool = True, **overrides
) -> Path:
    """A saved tiny model of ``arch`` (config ``overrides`` applied), with a tokenizer trained on ``text`` (with or
    without an EOS token)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    cfg = tiny_config(arch, layers, **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    # Larger weights than the default init so pruning visibly hurts and reconstruction visibly helps.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # experts' fused weights too
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    train_tokenizer(text if text is not None else CALIB.read_text()[:200_000], eos).save_pretrained(folder)
    return folder


def streamed_logits(work, stage: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a work directory's model computed block by block from its shards (the streaming path)."""
    from freelunch_cli.model.skeleton import Skeleton, run_block

    sk = Skeleton.from_work(work, stage, "cpu", torch.float32)
    with torch.no_grad():
        h = sk.embed(ids)
        for i in range(sk.num_blocks):
            h = run_block(sk.build_block(i), h, sk.block_call(i, *h.shape[:2]))
        return sk.logits(h)


def clone_work(work, dst):
    """A copy of a work directory (``WorkDir``) at ``dst``, for a test to run later stages on."""
    from freelunch_cli.workdir.directory import WorkDir

    subprocess.run(["cp", "-a", str(work.root), str(dst)], check=True)
    return WorkDir(dst)


def claimers(folder: Path) -> set[int]:
    """Process ids of the workers that have claimed a window or block in ``folder`` so far."""
    pids = set()
    for p in Path(folder).glob("*.claim.*"):
        try:
            pids.add(int(json.loads(p.read_text())["worker"].rsplit(":", 1)[1]))
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass  # being written: read again on the next poll
    return pids


def hold_first_claimer_until_both_claim(folder: Path, procs, timeout: float = 120.0) -> None:
    """Pause the first worker to claim something in ``folder`` until the other has claimed too. Otherwise a worker
    whose start (the torch import) is slow may find everything already done, and the test would not show sharing."""
    deadline, stopped = time.time() + timeout, None
    try:
        while time.time() < deadline and all(p.poll() is None for p in procs):
            pids = claimers(folder)
            if stopped is None and pids:
                stopped = next(iter(pids))
                os.kill(stopped, signal.SIGSTOP)
            if len(pids) >= 2:
                return
            time.sleep(0.01)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)


def calibrated_work(root: Path, layers: int = 4, arch: str = "llama"):
    """A tiny model of ``layers`` blocks, calibrated (8 x 32 tokens) in ``root/work``: blocks or windows to share."""
    from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
    from freelunch_cli.workdir.directory import WorkDir

    model = make_tiny_model(root / "model", arch, layers=layers)
    work = WorkDir(root / "work")
    calibrate(work, CalibrateConfig(model=str(model), data=str(CALIB), samples=8, seqlen=32, device="cpu"))
    return work


def start_worker(stage: str, work, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``freelunch STAGE --work WORK ARGS`` started as a process of its own (a worker), output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "freelunch_cli", stage, "--work", str(work.root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )

"""Architectures beyond Llama: mixture of experts (Mixtral, Qwen2-MoE), sandwich norms (Gemma2, Gemma3), fused
projections (Phi3); the attention each supports, position limits, and models that run their own code."""

import json

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.model.arch import Halves, block_halves, check_halves
from freelunch_cli.model.build import meta_model, position_limit, prepare_config
from freelunch_cli.model.moe import ExpertLinears, split_experts
from freelunch_cli.model.skeleton import Skeleton
from freelunch_cli.model.source import resolve_model
from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
from freelunch_cli.stages.evaluate import EvalConfig, evaluate
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import TensorRows

from helpers import CALIB, HELDOUT, make_tiny_model, tiny_config


def test_the_attention_implementation_is_one_the_model_supports():
    """transformers refuses SDPA for Gemma2; the others keep SDPA (causal without a materialised mask)."""
    assert prepare_config(tiny_config("gemma2"))._attn_implementation == "eager"
    assert prepare_config(tiny_config("gemma3"))._attn_implementation == "sdpa"
    assert prepare_config(tiny_config("llama"))._attn_implementation == "sdpa"


def test_experts_become_linear_layers_with_the_fused_state_dict():
    config = tiny_config("mixtral")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    fused = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
        assert split_experts(model) == 2  # one experts module per block
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ExpertLinears) and len(experts.gate_up_proj) == 4
    assert tuple(experts.gate_up_proj[1].weight.shape) == (2 * 128, 64) and tuple(experts.down_proj[1].weight.shape) == (64, 128)
    state = model.state_dict()
    assert state.keys() == fused.keys()  # checkpoints keep the library's layout
    for k in fused:
        assert torch.equal(state[k], fused[k]), k
    model.load_state_dict({k: torch.zeros_like(v) if "experts" in k else v for k, v in fused.items()})
    assert not experts.gate_up_proj[2].weight.any()


def test_an_unknown_expert_layout_is_refused_never_skipped():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])
            self.experts_weight = nn.Parameter(torch.zeros(2, 4, 4))  # 3-D, not the gate_up/down layout

    with pytest.raises(FreelunchError, match="unsupported mixture-of-experts layout: experts_weight"):
        split_experts(Odd())


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "phi3", "qwen2_moe"])
def test_the_two_halves_of_every_layout_compose_to_the_block(arch, more_calibrated):
    work = more_calibrated[arch]
    sk = Skeleton.from_work(work, "dense", "cpu", torch.float32)
    block, x = sk.build_block(1), TensorRows(work.boundary_path("dense", 1)).rows(0, 3).float()
    halves = block_halves(block, arch)
    check_halves(halves, block, x, sk.block_call(1, *x.shape[:2]), arch)  # raises if they do not compose
    if arch.startswith("gemma"):
        assert halves.attention_modules == ("input_layernorm", "self_attn", "post_attention_layernorm")
        assert halves.mlp_modules == ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm")
        pre_norm = Halves("input_layernorm", "self_attn", "post_attention_layernorm", ("mlp",), "llama")  # the old split
        with pytest.raises(FreelunchError, match="do not reproduce the block"):
            check_halves(pre_norm, block, x, sk.block_call(1, *x.shape[:2]), arch)


def test_sequence_lengths_beyond_the_position_table_are_refused_and_beyond_rotary_context_warned(tmp_path):
    opt = make_tiny_model(tmp_path / "opt", "opt", max_position_embeddings=32)
    work = WorkDir(tmp_path / "w")
    with pytest.raises(FreelunchError, match="learned position table of 32 positions"):
        calibrate(work, CalibrateConfig(model=str(opt), data=str(CALIB), samples=2, seqlen=64, device="cpu"))
    assert not work.root.exists()  # refused before anything was written
    calibrate(work, CalibrateConfig(model=str(opt), data=str(CALIB), samples=2, seqlen=16, device="cpu"))
    with pytest.raises(FreelunchError, match="--seqlen 64 is beyond .* 32 positions"):
        evaluate(work, EvalConfig(ppl=[str(HELDOUT)], seqlen=64, stage="dense", device="cpu"))
    llama = tiny_config("llama", max_position_embeddings=32)
    limit = position_limit(meta_model(llama), llama)
    assert (limit.positions, limit.learned) == (32, False)
    warnings = []
    limit.check(64, "--seqlen", warnings.append)
    assert warnings and "quality is unknown" in warnings[0]


def _custom_code_model(tmp_path):
    folder = make_tiny_model(tmp_path / "custom", "llama")
    (folder / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\nclass TinyCustomConfig(LlamaConfig):\n    model_type = 'tinycustom'\n"
    )
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_tiny import TinyCustomConfig\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="tinycustom",
        architectures=["TinyCustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_with_its_own_code_needs_trust_remote_code_and_keeps_its_code(tmp_path):
    folder = _custom_code_model(tmp_path)
    with pytest.raises(FreelunchError, match="runs its own code .*TinyCustomForCausalLM.*pass --trust-remote-code"):
        resolve_model(str(folder))
    work = WorkDir(tmp_path / "w")
    cfg = CalibrateConfig(model=str(folder), data=str(CALIB), samples=2, seqlen=16, device="cpu", trust_remote_code=True)
    calibrate(work, cfg)
    assert (work.model_dir("dense") / "modeling_tiny.py").exists() and work.is_recorded(
        work.model_dir("dense") / "modeling_tiny.py"
    )
    assert work.stage("calibrate").signature["trust_remote_code"] is True
    res = evaluate(work, EvalConfig(ppl=[str(HELDOUT)], seqlen=16, limit_sequences=2, stage="dense", device="cpu"))
    assert res["results"][0]["ppl"] > 1


def test_transposed_experts_are_refused_by_layout_before_anything_is_written(tmp_path):
    """Llama 4 keeps gate_up_proj as [experts, hidden, 2 x intermediate] without an is_transposed flag, and its
    experts' forward takes the routed tokens only: taken for Mixtral's layout, calibrate failed with a TypeError after
    writing the dense shards."""
    from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
    from freelunch_cli.workdir.directory import WorkDir

    from helpers import CALIB, VOCAB, train_tokenizer

    config = transformers.Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, max_position_embeddings=256,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    experts = model.model.layers[1].feed_forward.experts
    assert tuple(experts.gate_up_proj.shape) == (4, 64, 128)  # the layout the test is about
    with pytest.raises(
        FreelunchError, match=r"experts model\.layers\.1\.feed_forward\.experts \(Llama4TextExperts\) are stored transposed"
    ):
        split_experts(model)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    train_tokenizer(CALIB.read_text()[:50_000]).save_pretrained(folder)
    with pytest.raises(FreelunchError, match=r"unsupported mixture-of-experts layout: .* stored transposed"):
        calibrate(WorkDir(tmp_path / "w"), CalibrateConfig(model=str(folder), data=str(CALIB), samples=4, seqlen=32))
    assert not (tmp_path / "w").exists() or not any(p.is_file() for p in (tmp_path / "w").rglob("*"))

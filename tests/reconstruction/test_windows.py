"""Every window kind, input mode and PEFT variant of the paper, on tiny models."""

import pytest
import torch

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.model.arch import block_halves
from freelunch_cli.model.hooks import capture_linear_io
from freelunch_cli.model.skeleton import Skeleton, run_block
from freelunch_cli.reconstruction.windows import enumerate_windows
from freelunch_cli.stages.export import ExportConfig, export
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct
from freelunch_cli.workdir.files import TensorRows, load_tensors, read_json

from helpers import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_then_mlp_half_is_the_block(arch, calibrated):
    work = calibrated[arch]
    sk = Skeleton.from_work(work, "dense", "cpu", torch.float32)
    block = sk.build_block(1)
    x = TensorRows(work.boundary_path("dense", 1)).rows(0, 3).float()
    halves = block_halves(block, arch)
    with torch.no_grad():
        call = sk.block_call(1, *x.shape[:2])
        torch.testing.assert_close(halves.feed_forward(block, halves.attention(block, x, call)), run_block(block, x, call))


def test_enumeration_of_every_granularity():
    mats = ["q", "k", "v", "o", "up", "down"]
    assert [(w.first, w.part) for w in enumerate_windows(2, "submodule")] == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    m = enumerate_windows(2, "matrix", mats)
    assert len(m) == 12 and [w.index for w in m] == list(range(12)) and m[7].part == "k" and m[7].first == 1
    assert [(w.first, w.last) for w in enumerate_windows(7, "blocks:3")] == [(0, 2), (3, 5), (6, 6)]
    with pytest.raises(FreelunchError, match="unknown window"):
        enumerate_windows(2, "layer")


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("window", ["matrix", "submodule", "block", "blocks:2", "model"])
def test_every_window_lowers_its_loss(arch, window, fresh_work):
    work = fresh_work(arch)
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.6, device="cpu"))
    s = reconstruct(work, ReconstructConfig(window=window, lr=3e-3, epochs=4, device="cpu"))
    for w in range(s["windows"]):
        rec = read_json(work.window_record_path(w))
        assert rec["loss_after"] < rec["loss_before"], (window, rec["window"])
    for i in range(2):  # assembled blocks keep the masks
        recon = load_tensors(work.block_path("reconstructed", i))
        for name, keep in load_tensors(work.mask_path(i)).items():
            assert torch.all(recon[f"{name}.weight"][~keep] == 0)


@pytest.mark.parametrize("peft", ["full", "bias-norm", "lora", "masked-lora"])
def test_every_peft_variant_keeps_the_exact_zeros_and_counts_parameters(peft, fresh_work, tmp_path):
    work = fresh_work("qwen2")  # Qwen2 has q/k/v biases: bias-norm trains biases and norms
    prune(work, PruneConfig(criterion="wanda", sparsity=0.5, device="cpu"))
    reconstruct(work, ReconstructConfig(window="block", peft=peft, lora_rank=4, lr=3e-3, epochs=3, device="cpu"))
    out = tmp_path / "hf"
    export(work, ExportConfig(out=str(out)))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    pruned_state = load_tensors(work.block_path("pruned", 0))
    masks = load_tensors(work.mask_path(0))
    block = model.model.layers[0]
    for name, keep in masks.items():
        w = block.get_submodule(name).weight
        assert torch.all(w[~keep] == 0), name  # every pruned weight is still exactly zero
        assert int((w[keep] == 0).sum()) == 0 or peft != "full"  # and training did not prune more
    rec = read_json(work.window_record_path(0))
    assert rec["loss_after"] < rec["loss_before"]
    linears = {n: pruned_state[f"{n}.weight"].shape for n in masks}
    if peft == "full":
        expected = sum(v.numel() for v in pruned_state.values())
    elif peft == "bias-norm":
        expected = sum(v.numel() for k, v in pruned_state.items() if k.endswith("bias") or "norm" in k)
    else:
        expected = sum(4 * (shape[0] + shape[1]) for shape in linears.values())
    assert rec["trainable_params"] == expected
    changed = load_tensors(work.block_path("reconstructed", 0))
    if peft == "bias-norm":  # weights of linears untouched, biases moved
        assert all(torch.equal(changed[f"{n}.weight"], pruned_state[f"{n}.weight"]) for n in masks)
        assert not torch.equal(changed["self_attn.q_proj.bias"], pruned_state["self_attn.q_proj.bias"])
    else:
        assert not torch.equal(changed["mlp.up_proj.weight"], pruned_state["mlp.up_proj.weight"])


@pytest.mark.parametrize("window", ["block", "submodule", "matrix"])
def test_sparse_inputs_chain_the_reconstructed_outputs(window, fresh_work):
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
    reconstruct(work, ReconstructConfig(window=window, inputs="sparse", lr=3e-3, epochs=2, keep_cache=True, device="cpu"))
    sk = Skeleton.from_work(work, "reconstructed", "cpu", torch.float32)
    x = TensorRows(work.boundary_path("dense", 0)).rows(0, 16).float()
    with torch.no_grad():
        block0 = sk.build_block(0)
        expected = run_block(block0, x, sk.block_call(0, *x.shape[:2]))
        stored = TensorRows(work.root / "acts" / "recon" / "boundary_001.safetensors").rows(0, 16).float()
        torch.testing.assert_close(stored, expected, atol=3e-3, rtol=3e-3)
        if window == "submodule":  # block 1's MLP read block 1's reconstructed attention output
            h1 = stored
            mid = block_halves(sk.build_block(1), "llama").attention(sk.build_block(1), h1, sk.block_call(1, *h1.shape[:2]))
            torch.testing.assert_close(
                TensorRows(work.root / "acts" / "recon" / "mid_001.safetensors").rows(0, 16).float(), mid, atol=3e-3, rtol=3e-3
            )
    # dense inputs give a different model (the inputs differ from window 2 on)
    other = fresh_work("llama")
    prune(other, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
    reconstruct(other, ReconstructConfig(window=window, inputs="dense", lr=3e-3, epochs=2, device="cpu"))
    a, b = load_tensors(work.block_path("reconstructed", 1)), load_tensors(other.block_path("reconstructed", 1))
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("window", ["submodule", "matrix"])
def test_sparse_inputs_in_the_first_block_read_what_its_reconstructed_windows_give(window, fresh_work):
    """Block 0 reads the embeddings, which pruning leaves alone, but a later window of block 0 must still see what the
    block's earlier, reconstructed windows give: the MLP half the reconstructed attention's output, o_proj the input
    q/k/v reconstructed give it. Its loss before training is computed here from those inputs, independently."""
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
    reconstruct(
        work,
        ReconstructConfig(
            window=window, inputs="sparse", lr=3e-3, epochs=2, keep_cache=True, loss_samples=0, val_fraction=0.0, device="cpu"
        ),
    )
    sk = Skeleton.from_work(work, "dense", "cpu", torch.float32)
    x0 = TensorRows(work.boundary_path("dense", 0)).rows(0, 16).float()
    call = sk.block_call(0, *x0.shape[:2])
    pruned, recon = load_tensors(work.block_path("pruned", 0)), load_tensors(work.block_path("reconstructed", 0))
    with torch.no_grad():
        if window == "submodule":  # window 1: block 0's MLP half, on the stored output of its reconstructed attention
            mid = TensorRows(work.root / "acts" / "recon" / "mid_000.safetensors").rows(0, 16).float()
            y = block_halves(sk.build_block(0, pruned), "llama").feed_forward(sk.build_block(0, pruned), mid)
            target = TensorRows(work.boundary_path("dense", 1)).rows(0, 16).float()
            index = 1
        else:  # window 3: o_proj, after q, k and v were reconstructed
            current = {**recon, "self_attn.o_proj.weight": pruned["self_attn.o_proj.weight"]}
            block = sk.build_block(0, current)
            x, _ = capture_linear_io(block, "self_attn.o_proj", lambda: run_block(block, x0, call))
            y = block.self_attn.o_proj(x)
            dense = sk.build_block(0, load_tensors(work.block_path("dense", 0)))
            _, target = capture_linear_io(dense, "self_attn.o_proj", lambda: run_block(dense, x0, call))
            index = 3
    rec = read_json(work.window_record_path(index))
    assert rec["loss_before"] == pytest.approx(float(torch.mean((y - target) ** 2)), rel=1e-4)


def test_steps_warmup_validation_and_keep_best(fresh_work):
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
    reconstruct(
        work,
        ReconstructConfig(
            window="block", steps=7, warmup=0.3, lr=3e-2, grad_clip=1.0, val_fraction=0.25, keep_best=True, device="cpu"
        ),
    )
    for w in range(2):
        rec = read_json(work.window_record_path(w))
        assert rec["steps"] == 7
        assert rec["val_loss_after"] <= rec["val_loss_before"]
        assert "best_step" in rec
    with pytest.raises(FreelunchError, match="--keep-best needs"):
        reconstruct(work, ReconstructConfig(keep_best=True, val_fraction=0.0), force=True)


@pytest.mark.parametrize("chunk", [512, 5])  # the head on all positions of a sequence at once, or 5 at a time
def test_kl_term_on_the_last_window(chunk, fresh_work, monkeypatch):
    import freelunch_cli.engine.runner as runner

    monkeypatch.setattr(runner, "KL_CHUNK", chunk)
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
    reconstruct(work, ReconstructConfig(window="block", lr=1e-3, kl_weight=0.5, keep_cache=True, val_fraction=0.0, device="cpu"))
    first, last = read_json(work.window_record_path(0)), read_json(work.window_record_path(1))
    assert "kl_weight" not in first and last["kl_weight"] == 0.5
    # the last window's starting loss is MSE + 0.5 * KL(dense || pruned) of the next-token distributions
    sk = Skeleton.from_work(work, "pruned", "cpu", torch.float32)
    x = TensorRows(work.boundary_path("dense", 1)).rows(0, 16).float()
    t = TensorRows(work.boundary_path("dense", 2)).rows(0, 16).float()
    with torch.no_grad():
        y = run_block(sk.build_block(1), x, sk.block_call(1, *x.shape[:2]))
        p, q = torch.log_softmax(sk.logits(t), -1), torch.log_softmax(sk.logits(y), -1)
        kl = (p.exp() * (p - q)).sum(-1).mean()
        expected = torch.mean((y - t) ** 2) + 0.5 * kl
    assert last["loss_before"] == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_submodule_windows_of_sandwich_norm_blocks_start_at_zero_loss_when_nothing_is_pruned(arch, fresh_work):
    """Gemma blocks normalise each submodule's output too: with the Llama split the MLP window started at a loss of
    about 1.9 on an unpruned model and training changed a model that needed no repair."""
    work = fresh_work(arch)
    report = prune(work, PruneConfig(criterion="magnitude", sparsity=0.001, scope="row", device="cpu"))  # 0 per row
    assert report["block_weight_sparsity"] == 0
    reconstruct(work, ReconstructConfig(window="submodule", steps=2, loss_samples=0, device="cpu"))
    for w in range(4):
        assert read_json(work.window_record_path(w))["loss_before"] < 1e-6, w  # float16 cache rounding; the old split: ~1.9


@pytest.mark.parametrize("window", ["block", "matrix"])
def test_experts_are_trained_by_reconstruction_with_their_masks_kept(window, fresh_work):
    work = fresh_work("mixtral")
    prune(work, PruneConfig(criterion="wanda", sparsity=0.5, device="cpu"))
    s = reconstruct(work, ReconstructConfig(window=window, lr=3e-3, epochs=2, device="cpu"))
    assert s["loss_after"] < s["loss_before"]
    for i in range(2):
        pruned, recon = load_tensors(work.block_path("pruned", i)), load_tensors(work.block_path("reconstructed", i))
        masks = load_tensors(work.mask_path(i))
        for e in range(4):
            keep = masks[f"mlp.experts.down_proj.{e}"]
            assert torch.all(recon["mlp.experts.down_proj"][e][~keep] == 0)
        assert not torch.equal(recon["mlp.experts.gate_up_proj"], pruned["mlp.experts.gate_up_proj"])


def test_window_kinds_use_only_their_context_protocol():
    """Window kinds reach whoever runs them only through ``WindowContext``, and the runner provides all of it."""
    import ast
    import inspect

    from freelunch_cli.engine.runner import WindowRunner
    from freelunch_cli.reconstruction import windows

    tree = ast.parse(inspect.getsource(windows))
    protocol = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "WindowContext")
    members = {n.name for n in protocol.body if isinstance(n, ast.FunctionDef)}
    members |= {n.target.id for n in protocol.body if isinstance(n, ast.AnnAssign)}
    used = {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "ctx"
    }
    assert used and used <= members, used - members
    methods = {n.name for n in protocol.body if isinstance(n, ast.FunctionDef)}
    assert all(hasattr(WindowRunner, m) for m in methods)  # the attributes (stream, sparse_inputs) are set in __init__

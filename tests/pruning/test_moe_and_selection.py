"""Every expert pruned with statistics from its own tokens; sparsity counted from the weights; --skip and --skip-blocks
that select nothing refused; a singular SparseGPT Hessian dampened or explained."""

import pytest
import torch

from freelunch_cli.core.console import Reporter
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.model.skeleton import Skeleton
from freelunch_cli.pruning.masks import keep_mask, parse_pattern
from freelunch_cli.pruning.sparsegpt import SingularHessian, SparseGPT, inverse_hessian_factor
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.workdir.files import TensorRows, load_tensors, read_json

from helpers import SAMPLES


def _block_zero_share(work, blocks=2) -> float:
    """Zeros over every weight matrix of the pruned blocks, counted here from the shards."""
    z = n = 0
    for i in range(blocks):
        for v in load_tensors(work.block_path("pruned", i)).values():
            if v.is_floating_point() and v.dim() >= 2:
                z, n = z + int((v == 0).sum()), n + v.numel()
    return z / n


def test_every_expert_is_pruned_with_the_statistics_of_the_tokens_routed_to_it(fresh_work):
    work = fresh_work("mixtral")
    s = prune(work, PruneConfig(criterion="wanda", sparsity=0.5, stats="dense", device="cpu"))
    pruned, masks = load_tensors(work.block_path("pruned", 0)), load_tensors(work.mask_path(0))
    for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        for e in range(4):  # every expert's fused slice at exactly 50% per row
            assert torch.all((pruned[name][e] == 0).sum(1) == pruned[name].shape[2] // 2), (name, e)
            assert torch.equal(masks[f"{name}.{e}"], pruned[name][e] != 0)
    # Wanda's input norms of expert 2's gate_up_proj, from the tokens the router sends it, computed independently
    sk = Skeleton.from_work(work, "dense", "cpu", torch.float32)
    dense = sk.build_block(0, load_tensors(work.block_path("dense", 0)))
    x = TensorRows(work.boundary_path("dense", 0)).rows(0, SAMPLES).float()
    seen = {}
    dense.mlp.register_forward_pre_hook(lambda mod, args: seen.update(h=args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        dense(x, *sk.block_call(0, *x.shape[:2])[0], **sk.block_call(0, *x.shape[:2])[1])
        _, _, top = dense.mlp.gate(seen["h"])
    routed = seen["h"][(top == 2).any(-1)]
    assert 0 < routed.shape[0] < seen["h"].shape[0]
    w = load_tensors(work.block_path("dense", 0))["mlp.experts.gate_up_proj"][2]
    expected = keep_mask(w.abs() * routed.pow(2).sum(0).sqrt()[None, :], parse_pattern(None, 0.5, "row"))
    assert torch.equal(masks["mlp.experts.gate_up_proj.2"], expected)
    # the routers stay dense, so the share over all block weights sits just under the pruned matrices' 0.5
    assert s["pruned_matrix_sparsity"] == 0.5 and s["block_weight_sparsity"] == pytest.approx(_block_zero_share(work))
    assert 0.49 < s["block_weight_sparsity"] < 0.5


def test_the_shared_expert_is_pruned_and_its_gate_left_dense(fresh_work):
    work = fresh_work("qwen2_moe")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
    pruned = load_tensors(work.block_path("pruned", 1))
    for name in ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.down_proj.weight"):
        assert float((pruned[name] == 0).float().mean()) == 0.5
    assert float((pruned["mlp.experts.down_proj"] == 0).float().mean()) == 0.5
    assert not (pruned["mlp.shared_expert_gate.weight"] == 0).any()
    rows = {(m["block"], m["name"]): m for m in read_json(work.prune_report_path)["matrices"]}
    assert rows[(1, "mlp.shared_expert_gate")]["pruned"] is False and rows[(1, "mlp.experts.gate_up_proj.3")]["pruned"] is True


def test_every_sparsity_is_counted_from_the_weights_and_says_what_it_covers(fresh_work, capsys):
    work = fresh_work("llama")
    s = prune(work, PruneConfig(criterion="wanda", sparsity=0.5, skip=["mlp.*"], device="cpu"), Reporter())
    report = read_json(work.prune_report_path)
    real = _block_zero_share(work)
    assert report["sparsity_linear"] == pytest.approx(real) and s["block_weight_sparsity"] == pytest.approx(real)
    assert real < 0.3 and report["sparsity_pruned"] == 0.5 and report["matrices_dense"] == 6
    err = capsys.readouterr().err
    assert f"{real:.4f} of all block weights are zero (0.5000 of the 8 pruned matrices)" in " ".join(err.split())


@pytest.mark.parametrize("skip", [["mlp.down"], ["lm_head"], ["q_proj", "mlp.dwn_proj"]])
def test_a_skip_pattern_that_matches_nothing_is_refused_by_name(skip, fresh_work):
    work = fresh_work("llama")
    before = work.manifest_path.read_bytes()
    with pytest.raises(FreelunchError, match=f"--skip '{skip[-1]}' matches no matrix"):
        prune(work, PruneConfig(criterion="magnitude", skip=skip, device="cpu"))
    assert work.manifest_path.read_bytes() == before


@pytest.mark.parametrize("how", [{"skip": ["layers.0.*"]}, {"skip_blocks": "0"}, {"skip_blocks": "-2"}])
def test_whole_blocks_can_be_left_dense(how, fresh_work):
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu", **how))
    dense, pruned = load_tensors(work.block_path("dense", 0)), load_tensors(work.block_path("pruned", 0))
    assert all(torch.equal(dense[k], pruned[k]) for k in dense)
    assert float((load_tensors(work.block_path("pruned", 1))["mlp.up_proj.weight"] == 0).float().mean()) == 0.5
    with pytest.raises(FreelunchError, match="--skip-blocks 5: the model has blocks 0 to 1"):
        prune(work, PruneConfig(criterion="magnitude", skip_blocks="5", device="cpu"), force=True)


def test_a_singular_hessian_is_dampened_more_and_a_non_finite_one_explained():
    torch.manual_seed(0)
    gpt = SparseGPT(64)
    gpt.add_batch(torch.randn(8, 64))  # 8 tokens for 64 inputs: rank 8
    w, keep = gpt.prune(torch.randn(16, 64), parse_pattern(None, 0.5, "row"), block_size=64, damp=1e-12)
    assert gpt.damp_used > 1e-12 and torch.isfinite(w).all() and int((~keep).sum()) == 16 * 32
    bad = torch.eye(8)
    bad[0, 0] = float("nan")
    with pytest.raises(SingularHessian) as e:
        inverse_hessian_factor(bad, 0.01, tokens=3)
    assert e.value.finite is False and e.value.tokens == 3


def test_sparsegpt_on_too_few_tokens_says_it_raised_the_dampening(tiny_models, tmp_path, capsys):
    from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
    from freelunch_cli.workdir.directory import WorkDir

    from helpers import CALIB

    work = WorkDir(tmp_path / "w")
    calibrate(work, CalibrateConfig(model=str(tiny_models["llama"]), data=str(CALIB), samples=1, seqlen=8, device="cpu"))
    prune(work, PruneConfig(criterion="sparsegpt", damp=1e-9, device="cpu"), Reporter())
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "block 0 self_attn.q_proj, self_attn.k_proj, self_attn.v_proj: the Hessian of 8 calibration tokens for 64 inputs is singular at --damp 1e-09"
        in err
    )
    assert all(torch.isfinite(v).all() for v in load_tensors(work.block_path("pruned", 0)).values())


def test_calibrate_keeps_each_matrix_s_dense_input_norms(calibrated):
    """Wanda's statistics gathered by the dense pass, against a direct computation: the sum over every calibration
    token of the squared input of q_proj, which is the block's input after its first norm."""
    work = calibrated["llama"]
    stored = load_tensors(work.input_stats_path(1))
    sk = Skeleton.from_work(work, "dense", "cpu", torch.float32)
    x = TensorRows(work.boundary_path("dense", 1)).rows(0, SAMPLES).float()
    with torch.no_grad():
        h = sk.build_block(1).input_layernorm(x)
    torch.testing.assert_close(stored["self_attn.q_proj"].float(), h.pow(2).sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert set(stored) == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }

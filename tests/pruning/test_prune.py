import pytest
import torch

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.model.skeleton import Skeleton, run_block
from freelunch_cli.pruning.criteria import magnitude_score, wanda_score
from freelunch_cli.pruning.masks import keep_mask, parse_pattern
from freelunch_cli.pruning.stats import LinearStats
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.workdir.files import TensorRows, load_tensors, read_json


def test_row_matrix_and_nm_counts_are_exact():
    torch.manual_seed(0)
    score = torch.randn(24, 40)
    score[0, :10] = 1.0  # ties: counts must stay exact
    row = keep_mask(score, parse_pattern(None, 0.3, "row"))
    assert ((~row).sum(1) == int(40 * 0.3)).all()
    mat = keep_mask(score, parse_pattern(None, 0.3, "matrix"))
    assert int((~mat).sum()) == int(24 * 40 * 0.3)
    for pat, (n, m) in {"2:4": (2, 4), "4:8": (4, 8), "1:4": (1, 4)}.items():
        keep = keep_mask(score, parse_pattern(pat, None))
        assert (keep.view(24, 40 // m, m).sum(-1) == n).all()
    # the kept weights are the highest-scoring ones in each row
    k = row.sum(1)[0]
    assert torch.equal(row[5], score[5] >= score[5].sort(descending=True).values[k - 1])


@pytest.mark.parametrize("bad", ["0", "1", "-0.1", "abc", "1.5"])
def test_bad_sparsity(bad):
    with pytest.raises(FreelunchError, match="sparsity"):
        parse_pattern(None, bad)


@pytest.mark.parametrize("bad", ["4:2", "0:4", "2:2", "x:4", "2-4"])
def test_bad_pattern(bad):
    with pytest.raises(FreelunchError, match="pattern"):
        parse_pattern(bad, None)


def test_wanda_score_from_its_definition():
    torch.manual_seed(1)
    w, x = torch.randn(6, 10), torch.randn(3, 7, 10)
    st = LinearStats(10)
    st.add(x[:2])
    st.add(x[2:])
    direct = torch.stack([torch.stack([w[i, j].abs() * x[..., j].flatten().norm() for j in range(10)]) for i in range(6)])
    torch.testing.assert_close(wanda_score(w, st), direct)
    torch.testing.assert_close(magnitude_score(w), w.abs())


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_wanda_prune_of_a_work_dir(arch, fresh_work):
    work = fresh_work(arch)
    summary = prune(work, PruneConfig(criterion="wanda", sparsity=0.5, device="cpu"))
    report = read_json(work.root / "prune" / "report.json")
    assert summary["achieved_sparsity"] == pytest.approx(0.5)
    assert {m["name"] for m in report["matrices"] if m["block"] == 0} >= ({"self_attn.q_proj", "self_attn.k_proj"})
    # block 0's mask equals a direct Wanda computation from the dense inputs of that block
    sk = Skeleton.from_work(work, "dense", "cpu", torch.float32)
    block = sk.build_block(0)
    x = TensorRows(work.boundary_path("dense", 0)).rows(0, 16).float()
    captured = {}
    name = "self_attn.v_proj"
    lin = block.get_submodule(name)
    h = lin.register_forward_pre_hook(lambda m, a: captured.setdefault("x", []).append(a[0]))
    with torch.no_grad():
        run_block(block, x, sk.block_call(0, 16, x.shape[1]))
    h.remove()
    X = torch.cat(captured["x"]).reshape(-1, lin.in_features)
    score = lin.weight.abs() * X.norm(dim=0)[None, :]
    k = int(lin.in_features * 0.5)
    expected = torch.ones_like(score, dtype=torch.bool)
    expected.scatter_(1, score.argsort(dim=1, stable=True)[:, :k], False)
    masks = load_tensors(work.mask_path(0))
    assert torch.equal(masks[name], expected)
    pruned = load_tensors(work.block_path("pruned", 0))[f"{name}.weight"]
    assert torch.equal(pruned == 0, ~expected)


def test_nm_prune_and_skip(fresh_work):
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", pattern="2:4", skip=["down_proj"], device="cpu"))
    state = load_tensors(work.block_path("pruned", 1))
    q = state["self_attn.q_proj.weight"]
    assert ((q != 0).view(q.shape[0], -1, 4).sum(-1) <= 2).all()
    assert int((q == 0).sum()) == q.numel() // 2
    dense = load_tensors(work.block_path("dense", 1))
    assert torch.equal(state["mlp.down_proj.weight"], dense["mlp.down_proj.weight"])


def test_pattern_that_does_not_fit(fresh_work):
    work = fresh_work("llama")
    with pytest.raises(FreelunchError, match="not divisible by 3"):
        prune(work, PruneConfig(criterion="magnitude", pattern="2:3", device="cpu"))


def test_the_lowest_scores_are_the_first_of_a_stable_sort_ties_by_position():
    """Masks select with kthvalue (linear time): the same choice as a stable ascending sort, ties included."""
    from freelunch_cli.pruning.masks import lowest

    torch.manual_seed(0)
    for trial in range(300):
        rows, cols = torch.randint(1, 9, (2,)).tolist()
        score = torch.randint(0, 4, (rows, cols)).float() if trial % 2 else torch.rand(rows, cols)  # many ties, or none
        k = int(torch.randint(0, cols + 1, (1,)))
        expected = torch.zeros(rows, cols, dtype=torch.bool)
        if k:
            expected.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
        assert torch.equal(lowest(score, k), expected), (score, k)

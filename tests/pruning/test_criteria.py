"""Every criterion against an independent computation, and exact counts on a real work directory."""

import pytest
import torch

from freelunch_cli.model.skeleton import Skeleton, run_block
from freelunch_cli.pruning.criteria import ScoreOptions, random_score, ria_score
from freelunch_cli.pruning.masks import keep_mask, parse_pattern
from freelunch_cli.pruning.sparsegpt import SparseGPT
from freelunch_cli.pruning.stats import LinearStats
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.workdir.files import TensorRows, load_tensors


def _layer(rows=12, cols=16, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    # correlated inputs with uneven scales in no particular order, as real activations are
    scales = torch.linspace(0.2, 3, cols)[torch.randperm(cols, generator=g)]
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * scales
    return w, x


def _naive_obs(w, x, keep_n_of_m=None, sparsity=0.5, damp=0.01):
    """SparseGPT with one column block, in float64, inverting each trailing sub-Hessian explicitly."""
    W = w.double().clone()
    rows, cols = W.shape
    H = 2 * x.double().T @ x.double() / x.shape[0]
    H += damp * H.diag().mean() * torch.eye(cols, dtype=torch.float64)
    # saliency uses [H_F^-1]_jj with F = {j, ..., cols-1}, the diagonal of the Cholesky factor of H^-1 squared
    dj = torch.stack([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)])
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    if keep_n_of_m is None:
        sal = W**2 / dj  # the reference's w^2 / U_jj^2, where U_jj = sqrt([H_F^-1]_jj)
        k = int(W.numel() * sparsity)
        prune.view(-1)[torch.sort(sal.reshape(-1), stable=True).indices[:k]] = True
    for j in range(cols):
        if keep_n_of_m is not None and j % keep_n_of_m[1] == 0:
            n, m = keep_n_of_m
            sal = W[:, j : j + m] ** 2 / dj[j : j + m]
            prune.scatter_(1, j + torch.sort(sal, dim=1, stable=True).indices[:, : m - n], True)
        Finv = torch.linalg.inv(H[j:, j:])
        for r in range(rows):
            if prune[r, j]:
                # OBS: remove w_rj, update the remaining weights of the row optimally
                W[r, j:] -= W[r, j] / Finv[0, 0] * Finv[0, :]
                W[r, j] = 0.0
    return W, ~prune


def test_sparsegpt_equals_a_float64_obs_computation():
    w, x = _layer()
    gpt = SparseGPT(w.shape[1])
    for chunk in x.split(64):
        gpt.add_batch(chunk)
    torch.testing.assert_close(gpt.H, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    for pat, nm in (("unstructured", None), ("2:4", (2, 4))):
        pattern = parse_pattern(None if nm is None else pat, 0.5, "matrix")
        ours, keep = gpt.prune(w, pattern, block_size=w.shape[1])
        ref, ref_keep = _naive_obs(w, x, nm)
        assert torch.equal(keep, ref_keep), pat
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pat", ["unstructured", "2:4"])
def test_sparsegpt_beats_mask_only_methods_on_its_layer(pat):
    w, x = _layer(rows=32, cols=64, tokens=512, seed=3)
    pattern = parse_pattern(None if pat == "unstructured" else pat, 0.5, "row")
    gpt = SparseGPT(64)
    gpt.add_batch(x)
    ours, keep = gpt.prune(w, pattern, block_size=16)
    st = LinearStats(64)
    st.add(x)
    from freelunch_cli.pruning.criteria import magnitude_score, wanda_score

    def err(wh):
        return float(((w - wh) @ x.T).norm())

    e_mag = err(w * keep_mask(magnitude_score(w), pattern))
    e_wanda = err(w * keep_mask(wanda_score(w, st), pattern))
    assert err(ours) < e_wanda < e_mag
    # same budget, and the kept weights moved: it is not a mask-only method
    assert int((~keep).sum()) == int(keep_mask(magnitude_score(w), pattern).logical_not().sum())
    assert (ours[keep] != w[keep]).float().mean() > 0.9
    assert torch.all(ours[~keep] == 0)


def test_ria_from_its_definition():
    w, x = _layer(rows=6, cols=8, tokens=50, seed=5)
    st = LinearStats(8)
    st.add(x)
    direct = torch.empty(6, 8)
    for i in range(6):
        for j in range(8):
            a = w[i, j].abs()
            direct[i, j] = (a / w[i].abs().sum() + a / w[:, j].abs().sum()) * x[:, j].norm() ** 0.5
    torch.testing.assert_close(ria_score(w, st, ScoreOptions(ria_alpha=0.5)), direct)
    pattern = parse_pattern(None, 0.5, "row")
    expected = torch.ones(6, 8, dtype=torch.bool)
    expected.scatter_(1, direct.argsort(dim=1, stable=True)[:, :4], False)
    assert torch.equal(keep_mask(ria_score(w, st, ScoreOptions()), pattern), expected)


def test_random_scores_are_seeded_per_matrix():
    w = torch.zeros(5, 7)
    a = random_score(w, None, ScoreOptions(seed=1), "0.q")
    assert torch.equal(a, random_score(w, None, ScoreOptions(seed=1), "0.q"))
    assert not torch.equal(a, random_score(w, None, ScoreOptions(seed=2), "0.q"))
    assert not torch.equal(a, random_score(w, None, ScoreOptions(seed=1), "0.k"))


@pytest.mark.parametrize(
    "criterion,pattern,scope",
    [
        ("sparsegpt", None, "row"),
        ("sparsegpt", "2:4", None),
        ("ria", None, None),
        ("random", "1:4", None),
        ("random", None, "matrix"),
        ("wanda", "4:8", None),
    ],
)
def test_exact_counts_and_bit_identical_reruns(criterion, pattern, scope, fresh_work):
    work, twin = fresh_work("llama"), None
    cfg = PruneConfig(criterion=criterion, sparsity=0.5, pattern=pattern, scope=scope, device="cpu", block_size=32)
    prune(work, cfg)
    for i in range(2):
        for name, keep in load_tensors(work.mask_path(i)).items():
            rows, cols = keep.shape
            zeros = ~keep
            if pattern:
                n, m = map(int, pattern.split(":"))
                assert (zeros.view(rows, cols // m, m).sum(-1) == m - n).all(), name
            elif scope == "matrix":
                assert int(zeros.sum()) == int(keep.numel() * 0.5), name
            else:
                assert (zeros.sum(1) == int(cols * 0.5)).all(), name
    import shutil

    from freelunch_cli.workdir.directory import WorkDir

    twin = WorkDir(work.root.parent / "twin")
    shutil.copytree(work.root, twin.root)
    prune(twin, cfg, force=True)
    for i in range(2):
        a, b = load_tensors(work.block_path("pruned", i)), load_tensors(twin.block_path("pruned", i))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_sparse_stats_read_the_pruned_stream(fresh_work):
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="wanda", sparsity=0.5, stats="sparse", keep_cache=True, device="cpu"))
    sk = Skeleton.from_work(work, "pruned", "cpu", torch.float32)
    x = TensorRows(work.boundary_path("dense", 0)).rows(0, 16).float()
    with torch.no_grad():
        expected = run_block(sk.build_block(0), x, sk.block_call(0, *x.shape[:2]))
    stored = TensorRows(work.boundary_path("pruned", 1)).rows(0, 16).float()
    torch.testing.assert_close(stored, expected, atol=2e-3, rtol=2e-3)
    # and block 1's Wanda mask comes from those inputs, not from the dense ones
    dense = fresh_work("llama")
    prune(dense, PruneConfig(criterion="wanda", sparsity=0.5, stats="dense", device="cpu"))
    m_sparse, m_dense = load_tensors(work.mask_path(1)), load_tensors(dense.mask_path(1))
    assert torch.equal(load_tensors(work.mask_path(0))["mlp.up_proj"], load_tensors(dense.mask_path(0))["mlp.up_proj"])
    assert any(not torch.equal(m_sparse[k], m_dense[k]) for k in m_sparse)


def test_owl_layer_sparsities():
    from freelunch_cli.pruning.owl import layer_sparsities, outlier_ratio

    s = layer_sparsities([0.01, 0.03, 0.02, 0.05], 0.5, 0.08)
    assert sum(s) / 4 == pytest.approx(0.5)
    assert max(s) - min(s) == pytest.approx(0.16)  # the band is 2 * lambda wide
    assert s[3] < s[1] < s[2] < s[0]  # more outliers, fewer weights pruned
    assert outlier_ratio([torch.ones(99), torch.tensor([100.0])], 5.0) == pytest.approx(0.01)  # 100 > 5 * mean (1.99)


def test_owl_prunes_each_block_at_its_own_sparsity(fresh_work):
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="wanda", sparsity=0.5, owl=0.1, device="cpu"))
    plan = work.progress("prune")["block_sparsity"]
    assert len(plan) == 2 and sorted(plan) == pytest.approx([0.4, 0.6])
    for i, s in enumerate(plan):
        for name, keep in load_tensors(work.mask_path(i)).items():
            assert ((~keep).sum(1) == int(keep.shape[1] * s)).all(), name

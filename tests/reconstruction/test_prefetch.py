"""The prefetching path (on CUDA by default, forced on here): a background thread stages the next batch (reads and
copies only) while everything that computes runs on the training thread, so the model it trains is the sequential
one bit for bit; the skeleton's per-pass state is per thread; and a window keeps resident only what its memory
estimate leaves free."""

import threading

import pytest
import torch

import freelunch_cli.engine.runner as runner
import freelunch_cli.training.loop as loop
from freelunch_cli.core.console import Reporter
from freelunch_cli.model.skeleton import Skeleton
from freelunch_cli.reconstruction.memory import block_numbers, estimate, resident_budget
from freelunch_cli.stages.prune import PruneConfig, prune
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct, resolve_auto_window
from freelunch_cli.workdir.files import TensorRows, load_tensors

from helpers import SEQLEN


def _flat(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flat(o)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _flat(obj[k])]
    return []


def _same(a, b) -> bool:
    fa, fb = _flat(a), _flat(b)
    return len(fa) == len(fb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(fa, fb))


def test_two_threads_on_one_skeleton_get_the_sequential_results(calibrated):
    """A thread computing logits (the head) while another asks for block calls of new shapes (each a forward pass
    that resets what the stubs record) gets, call for call, what it gets alone. Before the capture was per thread,
    19 of 400 head() calls here returned wrong logits."""
    sk = Skeleton.from_work(calibrated["llama"], "dense", "cpu", torch.float32)
    hidden = torch.randn(2, SEQLEN, sk.config.hidden_size, generator=torch.Generator().manual_seed(0))
    shapes = [(1, SEQLEN), (3, SEQLEN // 2), (2, SEQLEN), (4, 8)]
    want_logits = sk.head(hidden)
    want_calls = {s: sk.block_call(1, *s) for s in shapes}
    wrong, errors = {"head": 0, "calls": 0}, []
    start = threading.Barrier(2)

    def heads():
        start.wait()
        for _ in range(200):
            wrong["head"] += not torch.equal(sk.head(hidden), want_logits)

    def calls():
        start.wait()
        for n in range(200):
            s = shapes[n % len(shapes)]  # a new shape each time: a cache miss, a forward pass of its own
            wrong["calls"] += not _same(sk.block_call(1, *s), want_calls[s])

    def guarded(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(f,)) for f in (heads, calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and wrong == {"head": 0, "calls": 0}


def _spy_threads(monkeypatch, where: dict):
    """Record which threads run the dense references, the head and the staging."""
    for owner, name in ((runner.WindowRunner, "dense_mid"), (runner.WindowRunner, "dense_matrix_io"), (Skeleton, "head")):
        real = getattr(owner, name)

        def spy(*a, _real=real, _name=name, **k):
            where.setdefault(_name, set()).add(threading.current_thread().name)
            return _real(*a, **k)

        monkeypatch.setattr(owner, name, spy)
    real_prefetch = runner.WindowRunner.prefetch

    def prefetch(self, idx):
        where.setdefault("prefetch", set()).add(threading.current_thread().name)
        return real_prefetch(self, idx)

    monkeypatch.setattr(runner.WindowRunner, "prefetch", prefetch)


@pytest.mark.parametrize(
    "window, share, extra",
    [
        ("submodule", 0.0, dict(kl_weight=0.5, epochs=2)),  # streamed files; the last MLP half with the head's KL term
        ("submodule", None, dict(kl_weight=0.5, val_fraction=0.25)),  # resident files; validation passes prefetched too
        ("matrix", 0.0, dict(steps=2)),  # the dense matrix's input and output, recomputed per batch
    ],
)
def test_prefetching_trains_the_sequential_model_bit_for_bit(fresh_work, monkeypatch, window, share, extra):
    if share is not None:
        monkeypatch.setattr(runner, "RESIDENT_SHARE", share)
    cfg = ReconstructConfig(window=window, lr=1e-3, batch_size=5, device="cpu", **extra)  # 16 samples: a short last batch
    models, where = {}, {}
    for ahead in (False, True):
        monkeypatch.setattr(loop, "PREFETCH", ahead)
        if ahead:
            _spy_threads(monkeypatch, where)
        work = fresh_work("llama")
        prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
        reconstruct(work, cfg)
        models[ahead] = [load_tensors(work.block_path("reconstructed", i)) for i in range(2)]
    main = threading.main_thread().name
    assert where["prefetch"] and main not in where["prefetch"]  # the batches were staged by the other thread
    computed = where.get("dense_mid", set()) | where.get("dense_matrix_io", set()) | where.get("head", set())
    assert computed == {main}  # and everything that computes ran here
    if "kl_weight" in extra:
        assert where["head"] == {main}
    for a, b in zip(models[False], models[True]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_resident_budget_is_what_the_estimate_leaves_free():
    gib = 2**30
    assert resident_budget(100 * gib, 30 * gib, 0.4) == 40 * gib  # the share binds
    assert resident_budget(100 * gib, 70 * gib, 0.4) == 30 * gib  # what training needs binds
    assert resident_budget(100 * gib, 120 * gib, 0.4) == 0  # nothing left
    assert resident_budget(100 * gib, 30 * gib, 0.4, limit=50 * gib) == 20 * gib  # --max-memory below the free memory


def test_window_auto_holds_resident_only_what_its_estimate_left_free(fresh_work, monkeypatch):
    """With a fake device of 1 TiB free, --max-memory is the limit: set to the chosen window's estimate plus one and a
    half activation files, each window holds one file resident and streams the other (40% of the free memory, what
    it held before, would have taken both and run past the estimate)."""
    work = fresh_work("llama")
    prune(work, PruneConfig(criterion="magnitude", sparsity=0.5, device="cpu"))
    monkeypatch.setattr(runner, "available_memory", lambda device: 1 << 40)
    sk = Skeleton.from_work(work, "pruned", "cpu", torch.float32)
    nums = block_numbers(sk.config, sk.templates[0])
    need = estimate("block", 1, nums, 4, SEQLEN)["total"]
    file = TensorRows(work.boundary_path("dense", 0)).nbytes
    assert estimate("model", 2, nums, 4, SEQLEN)["total"] > need + 2 * file  # so auto chooses block windows
    kinds = []
    real_rows = runner.WindowRunner.rows

    def rows(self, stream, name):
        out = real_rows(self, stream, name)
        kinds.append(type(out).__name__)
        return out

    monkeypatch.setattr(runner.WindowRunner, "rows", rows)
    cfg = ReconstructConfig(window="auto", max_memory=str(need + file * 3 // 2), batch_size=4, steps=1, dtype="float32")
    assert resolve_auto_window(work, cfg, "cpu", Reporter(quiet=True)).window == "block"
    reconstruct(work, cfg)
    assert kinds.count("ResidentRows") == 2 and kinds.count("TensorRows") == 2  # one of each per window

"""Dense activations at block boundaries: calibrate's dense pass writes them, and a stage that needs one that was
evicted (deleted on purpose by an earlier windowed stage) or never written on this node recomputes it here, from the
boundary before it, exactly as the dense pass did."""

from __future__ import annotations

import json

import torch

from freelunch_cli.configs.stage_configs import CalibrateConfig
from freelunch_cli.core.console import Reporter
from freelunch_cli.core.device import dtype_name, parse_dtype, resolve
from freelunch_cli.model.activations import write_activations
from freelunch_cli.model.arch import prunable_linears
from freelunch_cli.model.skeleton import Skeleton, run_block
from freelunch_cli.pruning.stats import StatsCollector
from freelunch_cli.workdir.directory import EVICTED, WorkDir
from freelunch_cli.workdir.files import TensorRows, load_tensors, save_tensors_atomic
from freelunch_cli.workdir.locks import locked_file


def write_boundary(
    work: WorkDir, sk: Skeleton, b: int, ids, cfg: CalibrateConfig, cache_dtype, compute, with_stats: bool, log=None
):
    """Dense boundary ``b``: the embeddings of the calibration ids ``[samples, seqlen]`` (``b`` = 0), else dense block
    ``b - 1`` run on boundary ``b - 1`` (with its input statistics when ``with_stats``). ``log`` hears of a boundary
    stored in a wider dtype than ``cache_dtype`` (``model.activations.write_activations``)."""
    if b == 0:
        samples, seqlen = ids.shape
        write_activations(
            work,
            work.boundary_path("dense", 0),
            lambda rows: sk.embed(ids[rows]),
            samples,
            seqlen,
            sk.config.hidden_size,
            cache_dtype,
            cfg.batch_size,
            "the embeddings",
            log,
        )
    else:
        what = f"the output of dense block {b - 1} (in {dtype_name(compute)})"
        dense_block_pass(work, sk, b - 1, cfg, cache_dtype, what, with_stats, log)


def dense_block_pass(
    work: WorkDir,
    sk: Skeleton,
    i: int,
    cfg: CalibrateConfig,
    cache_dtype: torch.dtype,
    what: str,
    with_stats: bool = True,
    log=None,
) -> None:
    """Dense block ``i`` on the stored boundary before it (so a resumed pass computes exactly what an uninterrupted one
    does): its output is boundary ``i + 1``, and the per-input sums of squares of its matrices, gathered on the way,
    are Wanda's and RIA's dense statistics, so that ``prune --stats dense`` needs no forward pass."""
    block = sk.build_block(i)
    prev = TensorRows(work.check_file(work.boundary_path("dense", i)))

    def producer(rows):
        x = prev.rows(rows.start, rows.stop).to(sk.device, sk.dtype)
        return run_block(block, x, sk.block_call(i, x.shape[0], x.shape[1]))

    collector = StatsCollector(prunable_linears(block))
    with collector:
        write_activations(
            work,
            work.boundary_path("dense", i + 1),
            producer,
            cfg.samples,
            cfg.seqlen,
            sk.config.hidden_size,
            cache_dtype,
            cfg.batch_size,
            what,
            log,
            collector.reset,  # a boundary written again in a wider dtype gathers its statistics again
        )
    if with_stats:
        stats = {name: st.sumsq for name, st in collector.stats.items()}
        tokens = {name: st.tokens for name, st in collector.stats.items()}
        path = work.input_stats_path(i)
        work.record_file(path, save_tensors_atomic(path, stats, {"tokens": json.dumps(tokens)}))


def restore_dense_boundaries(work: WorkDir, boundaries, device: str, rep: Reporter) -> None:
    """Recompute the dense activation files among ``boundaries`` that are missing from this process's cache folder:
    deleted by an earlier windowed stage once it no longer needed them (quantize after reconstruct), or never written
    on this node (a ``--cache-dir`` template such as ``$TMPDIR/fl`` gives each node its own folder). Each is computed
    from the boundary before it, as calibrate's dense pass does: the same numbers. Workers sharing the folder wait for
    each other; calibrate's record stays done."""
    boundaries = sorted(boundaries)

    def missing() -> list[int]:  # a per-node copy that is damaged (truncated) is recomputed as well
        return [b for b in boundaries if gone(b)]

    def gone(b: int) -> bool:
        trouble = work.problem(work.boundary_path("dense", b))
        return trouble in ("missing", EVICTED) or (trouble is not None and work.cache_per_node)

    if not missing():
        return
    (work.acts_dir / "dense").mkdir(parents=True, exist_ok=True)
    with locked_file(work.acts_dir / "dense" / ".restore.lock", blocking=True):
        todo = set()
        for b in missing():  # and the missing ones before it, down to one that is there (or the embeddings)
            while b >= 0 and b not in todo and gone(b):
                todo.add(b)
                b -= 1
        if not todo:
            return  # another worker of this node recomputed them meanwhile
        rep.info(f"recomputing {len(todo)} dense activation file(s) missing from {work.acts_dir / 'dense'}")
        cfg = CalibrateConfig(**work.stage("calibrate").summary["config"])
        dev, compute = resolve(device, cfg.dtype)
        cache_dtype = parse_dtype(cfg.cache_dtype)
        sk = Skeleton.from_work(work, "dense", dev, compute, rest_device="cpu")
        ids = load_tensors(work.check_file(work.tokens_path))["input_ids"]
        with torch.no_grad():
            for b in sorted(todo):
                write_boundary(work, sk, b, ids, cfg, cache_dtype, compute, with_stats=False)

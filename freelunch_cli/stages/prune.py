"""Stage 2: prune every decoder block's matrices (linear layers and each expert's), one block at a time, and report
the sparsity counted from the weights."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from freelunch_cli.configs.stage_configs import PruneConfig
from freelunch_cli.core.console import Reporter
from freelunch_cli.core.device import dtype_name, resolve
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.kill_points import kill_point
from freelunch_cli.engine.boundaries import restore_dense_boundaries
from freelunch_cli.engine.claims import Claim, Claims, claim_in_turn, detect_shard, own_first, wait_seconds, worker_id
from freelunch_cli.model.activations import cache_dtype_of, write_activations
from freelunch_cli.model.arch import block_linears, prunable_linears
from freelunch_cli.model.hooks import StopForward, capture_inputs, input_groups
from freelunch_cli.model.moe import get_matrix, set_matrix
from freelunch_cli.model.skeleton import Skeleton, run_block
from freelunch_cli.pruning.criteria import ScoreOptions, wanda_score
from freelunch_cli.pruning.masks import Pattern, check_fits, keep_mask
from freelunch_cli.pruning.owl import layer_sparsities, outlier_ratio
from freelunch_cli.pruning.selection import parse_blocks, skipped_matrices
from freelunch_cli.pruning.sparsegpt import SingularHessian, SparseGPT
from freelunch_cli.pruning.stats import LinearStats, StatsCollector
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import (
    TensorRows,
    count_params,
    load_tensors,
    read_json,
    save_tensors_atomic,
    tensor_metadata,
    write_json_atomic,
)
from freelunch_cli.workdir.locks import Busy, locked_file
from freelunch_cli.workdir.stage import StageRun, finished, open_stage

RECALIBRATE = "recalibrate with --dtype bfloat16 or float32 (`freelunch calibrate --force ...`)"


def prune(work: WorkDir, cfg: PruneConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False) -> dict:
    """Prune every matrix of every decoder block of the dense model in ``work``; write the pruned blocks, their bool
    keep-masks and ``prune/report.json``; return the summary.

    Everything the stage reads is checked before anything is discarded (``--force`` clears this stage and the later
    ones only once the inputs are known to be there). With ``--shard`` (or torchrun, or a Slurm array) any number of
    workers share the blocks through claim files, as reconstruct's windows; the worker that sees every block done writes
    the report. Returns the stage summary, or, for a worker that finished while another writes the report, what it ran.
    """
    rep = rep or Reporter(quiet=True)
    cfg.validate()
    pattern, crit = cfg.resolved()
    device, compute = resolve(cfg.device, cfg.dtype)
    cfg = replace(cfg, dtype=dtype_name(compute))  # recorded as run
    shard = detect_shard(cfg.shard)
    if shard is not None and crit.needs is not None and cfg.stats == "sparse":
        raise FreelunchError(
            "--stats sparse feeds each block the output of the blocks pruned before it, so blocks run in order and "
            "cannot be sharded; use --stats dense with --shard (or run prune in one process)"
        )
    if shard is not None and force:
        raise FreelunchError(
            "--force cannot be combined with sharded workers (each would start over); run "
            "`freelunch prune --prepare --force ...` once, then start the workers"
        )
    calib = work.require_done("calibrate", "prune")
    sk = Skeleton.from_work(work, "dense", device, compute, rest_device="cpu")
    n = sk.num_blocks
    matrices = {i: list(prunable_linears(t)) for i, t in enumerate(sk.templates)}  # meta-device blocks: names and shapes
    skipped = skipped_matrices(matrices, cfg.skip, parse_blocks(cfg.skip_blocks, n), sk.arch.layers_path)
    for i, template in enumerate(sk.templates):
        for name, lin in prunable_linears(template).items():
            if (i, name) not in skipped:
                check_fits(pattern, tuple(lin.weight.shape), f"block {i} {name}")
    pruner = BlockPruner(work, sk, crit, pattern, cfg, calib.summary["samples"], device, compute, skipped, rep)
    signature = cfg.signature(calib.run_id)
    if force or not finished(work, "prune", signature):
        # evicted by a windowed stage, or never written on this node (a per-node cache): recomputed before anything
        # is discarded; a finished prune run again reads none of them
        restore_dense_boundaries(work, pruner.dense_inputs(), cfg.device, rep)
        for path in pruner.inputs_needed():
            work.check_file(path)
    with open_stage(
        work, "prune", signature, rep, resume=resume or shard is not None, force=force, shared=shard is not None
    ) as run:
        if run.done:
            return run.summary
        if cfg.owl:  # every block's outlier ratio first: computed once, by whichever worker comes first
            with locked_file(work.lock_path("prune-owl"), blocking=True):
                pruner.block_sparsity = pruner.owl_plan()
        if cfg.prepare:
            return run.report(f"prune prepared in {work.root}: {n} blocks; start the workers", {"blocks": n, "prepared": True})
        done_before = sum(pruner.block_done(i) for i in range(n))
        who = f"shard {shard.index}/{shard.count} ({shard.source}), " if shard else ""
        rep.info(
            f"prune: {who}{crit.name}, {pattern.describe()}, statistics from the {cfg.stats if crit.needs else 'no'} "
            f"stream, {n} blocks ({done_before} already done)"
        )
        if skipped:
            rep.info(f"left dense: {len(skipped)} of {sum(len(v) for v in matrices.values())} matrices (--skip, --skip-blocks)")
        claims = Claims(work.prune_claims_dir, cfg.stale_after if shard is not None else 0.0)
        turns = claim_in_turn(own_first(list(range(n)), shard), pruner.block_done, claims, wait_seconds(cfg.stale_after))
        ran = []
        with rep.progress("prune", total=n, completed=done_before) as bar:
            for i, attempt in turns:
                started = run.seconds()
                record = pruner.prune_block(i, claims.held(i, attempt))
                if record is None:
                    rep.info(f"  block {i:3d} was taken over by another worker; its result is theirs")
                    continue
                ran.append(i)
                rep.info(f"  block {i:3d}: {_describe(record)}, {run.seconds() - started:.1f}s")
                kill_point("prune.block")
                bar.advance()
        return _finish(run, n, crit, pattern, cfg, ran)


def _finish(run: StageRun, n: int, crit, pattern: Pattern, cfg: PruneConfig, ran: list[int]) -> dict:
    """Write the report and mark the stage done, once: the first worker to get here does it; the others report the
    blocks they pruned."""
    work = run.work
    try:
        with locked_file(work.lock_path("prune-report"), blocking=False):
            st = work.stage("prune")
            if st.status == "done":
                return run.report(f"prune already done in {work.root}", st.summary)
            report = build_report(work, n, crit.name, pattern, cfg)
            records = [read_json(work.prune_block_record_path(i)) for i in range(n)]
            summary = {
                "work": str(work.root),
                "criterion": crit.name,
                "pattern": pattern.describe(),
                "stats": cfg.stats if crit.needs else None,
                "target_sparsity": pattern.sparsity,
                "achieved_sparsity": report["sparsity_pruned"],  # over the matrices it pruned
                "pruned_matrix_sparsity": report["sparsity_pruned"],
                "block_weight_sparsity": report["sparsity_linear"],  # over every weight matrix of the blocks
                "model_sparsity": report["sparsity_model"],  # over every parameter, embeddings and head included
                "matrices_pruned": report["matrices_pruned"],
                "matrices_dense": report["matrices_dense"],
                "workers": sorted({r.get("worker", "?") for r in records}),
                "ran_here": ran,
            }
            line = f"pruned {n} blocks with {crit.name} ({pattern.describe()}): {_describe(report)}, {run.seconds():.1f}s"
            return run.finish(summary, line, config=cfg)
    except Busy:
        return run.report(
            f"this worker pruned blocks {ran or 'none'}; another worker is writing the report", {"ran": ran, "reported": False}
        )


def _describe(rec: dict) -> str:
    """``0.1300 of all block weights are zero (0.5000 of the 14 pruned matrices)``: what each share is taken over."""
    return (
        f"{rec['zeros'] / max(rec['numel'], 1):.4f} of all block weights are zero "
        f"({rec['pruned_zeros'] / max(rec['pruned_numel'], 1):.4f} of the {rec['matrices_pruned']} pruned matrices)"
    )


class BlockPruner:
    """Prunes one block: statistics, masks (or SparseGPT updates), shards, and the pruned stream."""

    def __init__(
        self,
        work: WorkDir,
        sk: Skeleton,
        crit,
        pattern: Pattern,
        cfg: PruneConfig,
        samples: int,
        device,
        compute,
        skipped: set[tuple[int, str]],
        rep: Reporter,
    ):
        self.work, self.sk, self.crit, self.base_pattern, self.cfg = work, sk, crit, pattern, cfg
        self.samples, self.device, self.compute, self.skipped, self.rep = samples, device, compute, skipped, rep
        self.sparse_stream = crit.needs is not None and cfg.stats == "sparse"
        self.block_sparsity: list[float] | None = None
        # dense input norms gathered by calibrate's dense pass: Wanda, RIA and OWL need no forward pass then
        self.stored_stats = all(work.is_recorded(work.input_stats_path(i)) for i in range(sk.num_blocks))

    def dense_inputs(self) -> list[int]:
        """The dense boundaries this run reads: 0 for the pruned stream; every block's dense input for SparseGPT on the
        dense stream, and for dense input norms (Wanda, RIA, OWL) unless calibrate stored them."""
        blocks = {0} if self.sparse_stream else set()
        dense_norms = (self.crit.needs == "norms" and not self.sparse_stream) or self.cfg.owl
        if (self.crit.needs == "hessian" and not self.sparse_stream) or (dense_norms and not self.stored_stats):
            blocks.update(range(self.sk.num_blocks))
        return sorted(blocks)

    def inputs_needed(self) -> list:
        """The activation files this run reads (``dense_inputs``)."""
        return [self.work.boundary_path("dense", i) for i in self.dense_inputs()]

    def _dense_stats(self, block, i: int, linears: dict) -> dict:
        """Dense input statistics of block ``i``: as calibrate stored them, or from a pass over its dense inputs."""
        if not self.stored_stats:
            return self._input_stats(block, i, linears, TensorRows(self.work.check_file(self.work.boundary_path("dense", i))))
        path = self.work.check_file(self.work.input_stats_path(i))
        stored, tokens = load_tensors(path, device=self.device), json.loads(tensor_metadata(path)["tokens"])
        stats = {}
        for name, lin in linears.items():
            stats[name] = LinearStats(lin.in_features, self.device)
            stats[name].sumsq, stats[name].tokens = stored[name], tokens[name]
        return stats

    def block_done(self, i: int) -> bool:
        work = self.work
        return (
            work.is_recorded(work.block_path("pruned", i))
            and work.is_recorded(work.mask_path(i))
            and work.prune_block_record_path(i).exists()
        )

    def _prunable(self, block, i: int) -> dict:
        return {name: lin for name, lin in prunable_linears(block).items() if (i, name) not in self.skipped}

    def _inputs(self, i: int) -> TensorRows:
        if not self.sparse_stream or i == 0:
            return TensorRows(self.work.check_file(self.work.boundary_path("dense", i)))
        self._ensure_pruned_stream(i)
        return TensorRows(self.work.check_file(self.work.boundary_path("pruned", i)))

    def _ensure_pruned_stream(self, i: int) -> None:
        """Recreate pruned-stream boundaries that were deleted (or damaged) from the pruned blocks before them."""
        work = self.work
        start = i
        while start > 0 and not work.is_recorded(work.boundary_path("pruned", start)):
            start -= 1
        for j in range(start, i):
            src = TensorRows(work.check_file(work.boundary_path("pruned" if j > 0 else "dense", j)))
            block = self.sk.build_block(j, load_tensors(work.check_file(work.block_path("pruned", j))))
            self._write_stream(j, block, src)

    def _write_stream(self, i: int, block, inputs: TensorRows) -> None:
        """Boundary i+1 of the pruned stream: the pruned block i on its pruned-stream inputs."""

        def producer(rows_slice):
            x = inputs.rows(rows_slice.start, rows_slice.stop).to(self.device, self.compute)
            return run_block(block, x, self.sk.block_call(i, x.shape[0], x.shape[1]))

        write_activations(
            self.work,
            self.work.boundary_path("pruned", i + 1),
            producer,
            self.samples,
            inputs.shape[1],
            self.sk.config.hidden_size,
            cache_dtype_of(inputs),
            self.cfg.batch_size,
            f"the output of pruned block {i} (in {dtype_name(self.compute)})",
            self.rep.info,
        )

    def _run_all(self, block, i, inputs: TensorRows, limit: int | None = None):
        bs, n = self.cfg.batch_size, min(self.samples, limit or self.samples)
        for s in range(0, n, bs):
            x = inputs.rows(s, min(s + bs, n)).to(self.device, self.compute)
            try:
                yield x, run_block(block, x, self.sk.block_call(i, x.shape[0], x.shape[1]))
            except StopForward:
                yield x, None

    def _input_stats(self, block, i: int, linears: dict, inputs: TensorRows) -> dict:
        """Per-input norms of every matrix's calibration inputs (Wanda, RIA, OWL); an expert's are taken over the tokens
        routed to it. Raises FreelunchError for non-finite inputs."""
        collector = StatsCollector(linears)
        with torch.no_grad(), collector:
            for _ in self._run_all(block, i, inputs):
                pass
        bad = [name for name, st in collector.stats.items() if not bool(torch.isfinite(st.sumsq).all())]
        if bad:
            raise FreelunchError(
                f"the calibration statistics of block {i} {bad[0]} are NaN or infinite: its inputs overflowed; {RECALIBRATE}"
            )
        return collector.stats

    def owl_plan(self) -> list[float]:
        """Per-block sparsities from OWL outlier ratios of the dense blocks on the dense activations, computed once and
        kept in the manifest for --resume."""
        saved = self.work.progress("prune").get("block_sparsity")
        if saved is not None:
            return saved
        self.rep.info(f"OWL: outlier ratios of the dense blocks (m = {self.cfg.owl_m})")
        ratios = []
        for i in range(self.sk.num_blocks):
            block = self.sk.build_block(i, load_tensors(self.work.model_block_path("dense", i)))
            linears = self._prunable(block, i)
            stats = self._dense_stats(block, i, linears)
            ratios.append(outlier_ratio([wanda_score(lin.weight, stats[name]) for name, lin in linears.items()], self.cfg.owl_m))
            self.rep.info(f"  block {i:3d}: outlier ratio {ratios[-1]:.4f}")
        plan = layer_sparsities(ratios, self.base_pattern.sparsity, self.cfg.owl)
        self.work.set_progress("prune", "block_sparsity", plan)
        self.work.set_progress("prune", "outlier_ratio", ratios)
        self.rep.info("OWL block sparsities: " + ", ".join(f"{s:.3f}" for s in plan))
        return plan

    def _sparsegpt(self, block, i: int, linears: dict, inputs: TensorRows, state: dict, pattern: Pattern, beat):
        """SparseGPT on each group of matrices that share an input (one Hessian per group); (weights, masks)."""
        cfg, new_weights, masks = self.cfg, {}, {}
        groups = input_groups(linears, lambda: list(self._run_all(block, i, inputs, limit=1)))
        bsz = cfg.block_size if pattern.kind != "nm" else max(pattern.m, cfg.block_size - cfg.block_size % pattern.m)
        for group in groups:
            gpt = SparseGPT(linears[group[0]].in_features, self.device)
            capture_inputs(linears[group[0]], gpt.add_batch, lambda: list(self._run_all(block, i, inputs)))
            for name in group:
                try:
                    w, keep = gpt.prune(get_matrix(state, name).to(self.device), pattern, bsz, cfg.damp)
                except SingularHessian as e:
                    raise FreelunchError(_singular(i, name, e, cfg.damp)) from None
                if gpt.damp_used > cfg.damp and name == group[0]:
                    self.rep.warn(
                        f"block {i} {', '.join(group)}: the Hessian of {gpt.nsamples} calibration tokens for "
                        f"{linears[name].in_features} inputs is singular at --damp {cfg.damp:g}; pruned with "
                        f"damp {gpt.damp_used:g} instead (more calibration tokens, --samples or --seqlen, avoid this)"
                    )
                new_weights[name], masks[name] = w.cpu(), keep.cpu()
                beat()
        return new_weights, masks

    def prune_block(self, i: int, claim: Claim | None = None) -> dict | None:
        """Prune block ``i`` and write its shard, masks and record; returns the record (zeros counted from the weights).

        ``claim``, when given, hears of progress (each matrix: its heartbeat) and is asked before every write: None is
        returned, and nothing more written, once the block was taken over by another worker (this one declared dead)."""
        beat = claim.progress if claim is not None else lambda: None
        lost = (lambda: not claim.holds()) if claim is not None else lambda: False
        work, cfg = self.work, self.cfg
        pattern = (
            self.base_pattern if self.block_sparsity is None else replace(self.base_pattern, sparsity=self.block_sparsity[i])
        )
        state = load_tensors(work.model_block_path("dense", i))
        block = self.sk.build_block(i, state)
        everything = block_linears(block)
        linears = self._prunable(block, i)
        inputs = self._inputs(i) if self.crit.needs == "hessian" or self.sparse_stream else None
        with torch.no_grad():
            if self.crit.needs == "hessian":
                new_weights, masks = self._sparsegpt(block, i, linears, inputs, state, pattern, beat)
            else:
                stats = None
                if self.crit.needs == "norms":
                    stats = (
                        self._input_stats(block, i, linears, inputs)
                        if self.sparse_stream
                        else self._dense_stats(block, i, linears)
                    )
                opts = ScoreOptions(cfg.seed, cfg.ria_alpha)
                new_weights, masks = {}, {}
                for name in linears:
                    w = get_matrix(state, name)
                    keep = keep_mask(
                        self.crit.score(w.to(self.device), stats[name] if stats else None, opts, f"{i}.{name}"), pattern
                    ).cpu()
                    new_weights[name], masks[name] = w * keep.to(w.dtype), keep
                    beat()
        for name, w in new_weights.items():
            if not bool(torch.isfinite(w).all()):
                raise FreelunchError(f"block {i} {name}: pruning gave NaN or infinite weights; {RECALIBRATE}, or raise --damp")
            set_matrix(state, name, w)
        record = {
            "block": i,
            "matrices": [_matrix_row(i, name, get_matrix(state, name), name in masks) for name in everything],
            **_count_zeros(state),
            "worker": worker_id(),
        }
        record.update(_pruned_share(record["matrices"]))
        if lost():
            return None
        if self.sparse_stream and i + 1 < self.sk.num_blocks:
            self._write_stream(i, self.sk.build_block(i, state), inputs)
            beat()
        for path, write in (
            (work.mask_path(i), lambda p: work.record_file(p, save_tensors_atomic(p, masks))),
            (work.prune_block_record_path(i), lambda p: write_json_atomic(p, record)),
            (work.block_path("pruned", i), lambda p: work.record_file(p, save_tensors_atomic(p, state))),
        ):  # the block is done once its shard is recorded
            if lost():
                return None
            write(path)
            beat()
        if self.sparse_stream and i > 0 and not cfg.keep_cache:
            work.forget_file(work.boundary_path("pruned", i))
        return record


def _singular(i: int, name: str, e: SingularHessian, damp: float) -> str:
    if not e.finite:
        return f"block {i} {name}: SparseGPT's Hessian holds NaN or infinite values (its inputs overflowed); {RECALIBRATE}"
    return (
        f"block {i} {name}: SparseGPT's Hessian of {e.tokens} calibration tokens stays singular up to damp {e.damp:g} "
        f"(--damp {damp:g}); calibrate on more tokens (--samples, --seqlen) or pass a larger --damp"
    )


def _matrix_row(i: int, name: str, weight: torch.Tensor, pruned: bool) -> dict:
    zeros = int((weight == 0).sum())
    return {
        "block": i,
        "name": name,
        "shape": list(weight.shape),
        "zeros": zeros,
        "sparsity": zeros / weight.numel(),
        "pruned": pruned,
    }


def _count_zeros(state: dict[str, torch.Tensor]) -> dict:
    """Zeros and size of every weight matrix of a block (floating tensors of two or more dimensions, experts' 3-D
    tensors and routers included), counted from the weights."""
    mats = [v for v in state.values() if v.is_floating_point() and v.dim() >= 2]
    return {"zeros": sum(int((v == 0).sum()) for v in mats), "numel": sum(v.numel() for v in mats)}


def _pruned_share(rows: list[dict]) -> dict:
    pruned = [r for r in rows if r.get("pruned", True)]
    return {
        "pruned_zeros": sum(r["zeros"] for r in pruned),
        "matrices_pruned": len(pruned),
        "pruned_numel": sum(r["shape"][0] * r["shape"][1] for r in pruned),
    }


def build_report(work: WorkDir, n: int, criterion: str, pattern: Pattern, cfg: PruneConfig) -> dict:
    """prune/report.json: the sparsity of every block matrix (pruned or left dense), of the pruned matrices, of all block
    weight matrices and of the whole model, each counted from the written weights."""
    records = [read_json(work.prune_block_record_path(i)) for i in range(n)]
    for r in records:  # records of a run before the counts were kept: count from its shard
        if "numel" not in r:
            r.update(_count_zeros(load_tensors(work.block_path("pruned", r["block"]))), **_pruned_share(r["matrices"]))
    matrices = [m for r in records for m in r["matrices"]]
    totals = {k: sum(r[k] for r in records) for k in ("zeros", "numel", "pruned_zeros", "pruned_numel", "matrices_pruned")}
    total_params = sum(count_params(work.block_path("pruned", i)) for i in range(n)) + count_params(work.own_rest_path("dense"))
    report = {
        "criterion": criterion,
        "pattern": pattern.describe(),
        "target_sparsity": pattern.sparsity,
        "skip": cfg.skip,
        "skip_blocks": cfg.skip_blocks,
        "stats": cfg.stats,
        "sparsity_pruned": totals["pruned_zeros"] / max(totals["pruned_numel"], 1),  # over the matrices pruned
        "sparsity_linear": totals["zeros"] / max(totals["numel"], 1),  # over every weight matrix of the blocks
        "sparsity_model": totals["zeros"] / max(total_params, 1),  # over every parameter, embeddings and head included
        "matrices_pruned": totals["matrices_pruned"],
        "matrices_dense": len(matrices) - totals["matrices_pruned"],
        **totals,
        "matrices": matrices,
    }
    write_json_atomic(work.prune_report_path, report)
    return report

"""Stage 2: prune every decoder block's linear layers, one block at a time, and report the sparsity."""

from __future__ import annotations

import fnmatch
from dataclasses import replace

import torch

from freelunch_cli.core.console import Reporter
from freelunch_cli.core.device import parse_dtype, pick_device
from freelunch_cli.core.kill_points import kill_point
from freelunch_cli.model.activations import cache_dtype_of, write_activations
from freelunch_cli.model.arch import block_linears
from freelunch_cli.model.hooks import StopForward, capture_inputs, input_groups
from freelunch_cli.model.skeleton import Skeleton, run_block
from freelunch_cli.pruning.criteria import ScoreOptions, wanda_score
from freelunch_cli.pruning.masks import Pattern, check_fits, keep_mask
from freelunch_cli.pruning.owl import layer_sparsities, outlier_ratio
from freelunch_cli.pruning.sparsegpt import SparseGPT
from freelunch_cli.pruning.stats import StatsCollector
from freelunch_cli.stages.options import PruneConfig
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import TensorRows, count_params, load_tensors, read_json, save_tensors_atomic, write_json_atomic
from freelunch_cli.workdir.stage import open_stage


def prune(work: WorkDir, cfg: PruneConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False) -> dict:
    """Prune every linear layer of every decoder block of the dense model in ``work``; write the pruned blocks, their
    bool keep-masks and ``prune/report.json``; return the summary."""
    rep = rep or Reporter(quiet=True)
    cfg.validate()
    pattern, crit = cfg.resolved()
    compute = parse_dtype(cfg.dtype)
    device = pick_device(cfg.device)
    calib = work.require_done("calibrate", "prune")
    signature = cfg.signature(calib.run_id)
    sparse_stream = crit.needs is not None and cfg.stats == "sparse"
    sk = Skeleton.from_work(work, "dense", device, compute, rest_device="cpu")
    n = sk.num_blocks
    for i, template in enumerate(sk.templates):  # meta-device blocks: shapes only, nothing loaded
        for name, lin in block_linears(template).items():
            if not _skipped(name, cfg.skip):
                check_fits(pattern, tuple(lin.weight.shape), f"block {i} {name}")
    with open_stage(work, "prune", signature, rep, resume=resume, force=force) as run:
        if run.done:
            return run.summary
        todo = [
            i
            for i in range(n)
            if not (
                work.is_recorded(work.block_path("pruned", i))
                and work.is_recorded(work.mask_path(i))
                and work.prune_block_record_path(i).exists()
            )
        ]
        rep.info(
            f"prune: {crit.name}, {pattern.describe()}, statistics from the {cfg.stats if crit.needs else 'no'} stream, "
            f"{n} blocks ({n - len(todo)} already done)"
        )
        pruner = BlockPruner(work, sk, crit, pattern, cfg, calib.summary["samples"], device, compute)
        if cfg.owl:
            pruner.block_sparsity = pruner.owl_plan(rep)
        with rep.progress("prune", total=n, completed=n - len(todo)) as bar:
            for i in todo:
                started = run.seconds()
                rows = pruner.prune_block(i, sparse_stream)
                frac = sum(r["zeros"] for r in rows) / max(sum(r["shape"][0] * r["shape"][1] for r in rows), 1)
                rep.info(f"  block {i:3d}: {frac:.4f} of its linear weights pruned in {run.seconds() - started:.1f}s")
                kill_point("prune.block")
                bar.advance()
        report = build_report(work, n, crit.name, pattern, cfg)
        summary = {
            "work": str(work.root),
            "criterion": crit.name,
            "pattern": pattern.describe(),
            "stats": cfg.stats if crit.needs else None,
            "target_sparsity": pattern.sparsity,
            "achieved_sparsity": report["sparsity_linear"],
            "model_sparsity": report["sparsity_model"],
        }
        return run.finish(
            summary,
            f"pruned {n} blocks with {crit.name} ({pattern.describe()}): {report['sparsity_linear']:.4f} "
            f"of block weights are zero, {run.seconds():.1f}s",
            config=cfg,
        )


class BlockPruner:
    """Prunes one block: statistics, masks (or SparseGPT updates), shards, and the pruned stream."""

    def __init__(self, work: WorkDir, sk: Skeleton, crit, pattern: Pattern, cfg: PruneConfig, samples: int, device, compute):
        self.work, self.sk, self.crit, self.base_pattern, self.cfg = work, sk, crit, pattern, cfg
        self.samples, self.device, self.compute = samples, device, compute
        self.block_sparsity: list[float] | None = None

    def _inputs(self, i: int, sparse_stream: bool) -> TensorRows:
        if not sparse_stream or i == 0:
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
        """Per-input norms of every linear's calibration inputs (Wanda, RIA, OWL)."""
        collector = StatsCollector(linears)
        with torch.no_grad(), collector:
            for _ in self._run_all(block, i, inputs):
                pass
        return collector.stats

    def owl_plan(self, rep: Reporter) -> list[float]:
        """Per-block sparsities from OWL outlier ratios of the dense blocks on the dense activations, computed once and
        kept in the manifest for --resume."""
        saved = self.work.progress("prune").get("block_sparsity")
        if saved is not None:
            return saved
        rep.info(f"OWL: outlier ratios of the dense blocks (m = {self.cfg.owl_m})")
        ratios = []
        for i in range(self.sk.num_blocks):
            block = self.sk.build_block(i, load_tensors(self.work.stage_block_path("dense", i)))
            linears = {k: v for k, v in block_linears(block).items() if not _skipped(k, self.cfg.skip)}
            stats = self._input_stats(block, i, linears, TensorRows(self.work.check_file(self.work.boundary_path("dense", i))))
            ratios.append(outlier_ratio([wanda_score(lin.weight, stats[name]) for name, lin in linears.items()], self.cfg.owl_m))
            rep.info(f"  block {i:3d}: outlier ratio {ratios[-1]:.4f}")
        plan = layer_sparsities(ratios, self.base_pattern.sparsity, self.cfg.owl)
        self.work.set_progress("prune", "block_sparsity", plan)
        self.work.set_progress("prune", "outlier_ratio", ratios)
        rep.info("OWL block sparsities: " + ", ".join(f"{s:.3f}" for s in plan))
        return plan

    def prune_block(self, i: int, sparse_stream: bool) -> list[dict]:
        """Prune block ``i`` and write its shard, masks and record; returns one row per matrix."""
        work, cfg = self.work, self.cfg
        pattern = (
            self.base_pattern if self.block_sparsity is None else replace(self.base_pattern, sparsity=self.block_sparsity[i])
        )
        state = load_tensors(work.stage_block_path("dense", i))
        block = self.sk.build_block(i, state)
        linears = {k: v for k, v in block_linears(block).items() if not _skipped(k, cfg.skip)}
        inputs = self._inputs(i, sparse_stream) if self.crit.needs else None
        new_weights, masks = {}, {}
        with torch.no_grad():
            if self.crit.needs == "hessian":
                groups = input_groups(linears, lambda: list(self._run_all(block, i, inputs, limit=1)))
                for group in groups:
                    gpt = SparseGPT(linears[group[0]].in_features, self.device)
                    capture_inputs(linears[group[0]], gpt.add_batch, lambda: list(self._run_all(block, i, inputs)))
                    bsz = cfg.block_size if pattern.kind != "nm" else max(pattern.m, cfg.block_size - cfg.block_size % pattern.m)
                    for name in group:
                        w, keep = gpt.prune(state[f"{name}.weight"].to(self.device), pattern, bsz, cfg.damp)
                        new_weights[name], masks[name] = w.cpu(), keep.cpu()
                    del gpt
            else:
                stats = self._input_stats(block, i, linears, inputs) if self.crit.needs == "norms" else None
                opts = ScoreOptions(cfg.seed, cfg.ria_alpha)
                for name in linears:
                    w = state[f"{name}.weight"]
                    score = self.crit.score(w.to(self.device), stats[name] if stats else None, opts, f"{i}.{name}")
                    keep = keep_mask(score, pattern).cpu()
                    new_weights[name], masks[name] = w * keep.to(w.dtype), keep
        rows = []
        for name, w in new_weights.items():
            old = state[f"{name}.weight"]
            state[f"{name}.weight"] = w.to(old.dtype)
            keep = masks[name]
            zeros = int((~keep).sum())
            rows.append({"block": i, "name": name, "shape": list(old.shape), "zeros": zeros, "sparsity": zeros / keep.numel()})
        if sparse_stream and i + 1 < self.sk.num_blocks:
            self._write_stream(i, self.sk.build_block(i, state), inputs)
        work.record_file(work.mask_path(i), save_tensors_atomic(work.mask_path(i), masks))
        write_json_atomic(work.prune_block_record_path(i), {"block": i, "matrices": rows})
        path = work.block_path("pruned", i)
        work.record_file(path, save_tensors_atomic(path, state))  # the block is done once this is recorded
        if sparse_stream and i > 0 and not cfg.keep_cache:
            work.forget_file(work.boundary_path("pruned", i))
        return rows


def _skipped(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name.rsplit(".", 1)[-1], p) for p in patterns)


def build_report(work: WorkDir, n: int, criterion: str, pattern: Pattern, cfg: PruneConfig) -> dict:
    """prune/report.json: achieved sparsity of every matrix, of all pruned matrices, and of the whole model."""
    matrices = []
    for i in range(n):
        matrices += read_json(work.prune_block_record_path(i))["matrices"]
    zeros = sum(m["zeros"] for m in matrices)
    total_linear = sum(m["shape"][0] * m["shape"][1] for m in matrices)
    total_params = sum(count_params(work.block_path("pruned", i)) for i in range(n))
    total_params += count_params(work.own_rest_path("dense"))
    report = {
        "criterion": criterion,
        "pattern": pattern.describe(),
        "target_sparsity": pattern.sparsity,
        "skip": cfg.skip,
        "stats": cfg.stats,
        "sparsity_linear": zeros / max(total_linear, 1),
        "sparsity_model": zeros / max(total_params, 1),
        "zeros": zeros,
        "matrices": matrices,
    }
    write_json_atomic(work.prune_report_path, report)
    return report

"""Stage 2: prune every decoder block's linear layers, one block at a time, and report the sparsity."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from freelunch_cli.arch import block_linears
from freelunch_cli.calibrate import write_activations
from freelunch_cli.console import Reporter
from freelunch_cli.criteria import ScoreOptions, get_criterion
from freelunch_cli.errors import FreelunchError
from freelunch_cli.faults import checkpoint
from freelunch_cli.masks import Pattern, check_fits, keep_mask, parse_pattern
from freelunch_cli.owl import block_outlier_ratios, layer_sparsities
from freelunch_cli.runtime import dtype_name, parse_dtype, pick_device
from freelunch_cli.skeleton import Skeleton, run_block
from freelunch_cli.sparsegpt import SparseGPT
from freelunch_cli.stats import StatsCollector, StopForward, capture_inputs, input_groups
from freelunch_cli.storage import TensorRows, count_params, load_tensors, read_json, save_tensors_atomic, write_json_atomic
from freelunch_cli.workdir import WorkDir, stage_lock

STATS_MODES = ("sparse", "dense")


@dataclass
class PruneConfig:
    criterion: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str | None = None  # "N:M" or None for unstructured
    scope: str | None = None  # "row" | "matrix"; None: the criterion's default
    skip: list[str] = field(default_factory=list)  # fnmatch patterns of matrix names left dense
    stats: str = "sparse"  # statistics from the stream through already-pruned blocks, or the dense stream
    seed: int = 0  # for --criterion random
    ria_alpha: float = 0.5
    damp: float = 0.01  # SparseGPT dampening, fraction of the mean Hessian diagonal
    block_size: int = 128  # SparseGPT column block
    keep_cache: bool = False  # keep the pruned-stream activations (--stats sparse)
    owl: float = 0.0  # OWL: spread block sparsities over +-owl by outlier ratio (0: the same sparsity everywhere)
    owl_m: float = 5.0  # OWL: a score is an outlier above owl_m times its block's mean
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 8

    def resolved(self) -> tuple[Pattern, object]:
        crit = get_criterion(self.criterion)
        if self.stats not in STATS_MODES:
            raise FreelunchError(f"--stats must be sparse or dense, got {self.stats!r}")
        if not 0 < self.damp < 1 or self.block_size < 1:
            raise FreelunchError("--damp must be in (0, 1) and --block-size at least 1")
        if self.owl < 0 or (self.owl and self.pattern not in (None, "unstructured")):
            raise FreelunchError("--owl needs unstructured sparsity and a non-negative value (e.g. 0.08)")
        return parse_pattern(self.pattern, self.sparsity, self.scope or crit.default_scope), crit


def prune(work: WorkDir, cfg: PruneConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False) -> dict:
    rep = rep or Reporter(quiet=True)
    pattern, crit = cfg.resolved()
    compute = parse_dtype(cfg.dtype)
    device = pick_device(cfg.device)
    calib = work.require_done("calibrate", "prune")
    signature = {
        "calibrate_run": calib.run_id,
        "criterion": crit.name,
        "pattern": pattern.describe(),
        "sparsity": pattern.sparsity,
        "skip": sorted(cfg.skip),
        "stats": cfg.stats if crit.needs else None,
        "seed": cfg.seed if crit.name == "random" else None,
        "ria_alpha": cfg.ria_alpha if crit.name == "ria" else None,
        "damp": cfg.damp if crit.name == "sparsegpt" else None,
        "block_size": cfg.block_size if crit.name == "sparsegpt" else None,
        "dtype": dtype_name(compute),
        "owl": [cfg.owl, cfg.owl_m] if cfg.owl else None,
    }
    sparse_stream = crit.needs is not None and cfg.stats == "sparse"
    sk = Skeleton.from_work(work, "dense", device, compute, rest_device="cpu")
    n = sk.num_blocks
    for i, template in enumerate(sk.templates):  # meta-device blocks: shapes only, nothing loaded
        for name, lin in block_linears(template).items():
            if not _skipped(name, cfg.skip):
                check_fits(pattern, tuple(lin.weight.shape), f"block {i} {name}")
    with stage_lock(work, "prune"):
        state = work.begin("prune", signature, resume, force)
        if state == "done":
            return work.report_done("prune", rep)
        t0 = time.time()
        files = work.manifest()["files"]
        todo = [i for i in range(n) if work.rel(work.block_path("pruned", i)) not in files or work.rel(work.mask_path(i)) not in files
                or not (work.root / "prune" / "blocks" / f"{i:03d}.json").exists()]
        if work.damaged:
            rep.warn(f"recomputing {len(work.damaged)} missing or damaged file(s): {', '.join(work.damaged[:6])}")
        rep.info(f"prune: {crit.name}, {pattern.describe()}, statistics from the {cfg.stats if crit.needs else 'no'} stream, "
                 f"{n} blocks ({n - len(todo)} already done)")
        pruner = BlockPruner(work, sk, crit, pattern, cfg, calib.summary["samples"], device, compute)
        if cfg.owl:
            pruner.block_sparsity = owl_plan(work, sk, cfg, pattern, calib.summary["samples"], device, compute, rep)
        with rep.progress("prune", total=n, completed=n - len(todo)) as bar:
            for i in todo:
                t_block = time.time()
                rows = pruner.prune_block(i, sparse_stream)
                frac = sum(r["zeros"] for r in rows) / max(sum(r["shape"][0] * r["shape"][1] for r in rows), 1)
                rep.info(f"  block {i:3d}: {frac:.4f} of its linear weights pruned in {time.time() - t_block:.1f}s")
                checkpoint("prune.block")
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
            "seconds": round(time.time() - t0, 2),
            "config": asdict(cfg),
        }
        work.finish("prune", summary)
    rep.summary(
        f"pruned {n} blocks with {crit.name} ({pattern.describe()}): {report['sparsity_linear']:.4f} of block weights are zero, "
        f"{summary['seconds']:.1f}s",
        summary,
    )
    return summary


def owl_plan(work, sk, cfg, pattern, samples, device, compute, rep) -> list[float]:
    """Per-block sparsities from OWL outlier ratios, computed once and kept in the manifest for --resume."""
    saved = work.progress("prune").get("block_sparsity")
    if saved is not None:
        return saved
    rep.info(f"OWL: outlier ratios of the dense blocks (m = {cfg.owl_m})")
    ratios = block_outlier_ratios(work, sk, lambda name: not _skipped(name, cfg.skip), samples, cfg.batch_size, device, compute,
                                  cfg.owl_m, rep.info)
    plan = layer_sparsities(ratios, pattern.sparsity, cfg.owl)
    work.set_progress("prune", "block_sparsity", plan)
    work.set_progress("prune", "outlier_ratio", ratios)
    rep.info("OWL block sparsities: " + ", ".join(f"{s:.3f}" for s in plan))
    return plan


class BlockPruner:
    """Prunes one block: statistics, masks (or SparseGPT updates), shards, and the pruned stream."""

    def __init__(self, work, sk, crit, pattern, cfg, samples, device, compute):
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
        work, files = self.work, self.work.manifest()["files"]
        start = i
        while start > 0 and work.rel(work.boundary_path("pruned", start)) not in files:
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

        write_activations(self.work, self.work.boundary_path("pruned", i + 1), producer, self.samples, inputs.shape[1],
                          self.sk.config.hidden_size, _dtype_of(inputs), self.cfg.batch_size)

    def _run_all(self, block, i, inputs: TensorRows, limit: int | None = None):
        bs, n = self.cfg.batch_size, min(self.samples, limit or self.samples)
        for s in range(0, n, bs):
            x = inputs.rows(s, min(s + bs, n)).to(self.device, self.compute)
            try:
                yield x, run_block(block, x, self.sk.block_call(i, x.shape[0], x.shape[1]))
            except StopForward:
                yield x, None

    def prune_block(self, i: int, sparse_stream: bool) -> list[dict]:
        work, cfg = self.work, self.cfg
        pattern = self.base_pattern if self.block_sparsity is None else replace(self.base_pattern, sparsity=self.block_sparsity[i])
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
                stats = None
                if self.crit.needs == "norms":
                    collector = StatsCollector(linears)
                    with collector:
                        for _ in self._run_all(block, i, inputs):
                            pass
                    stats = collector.stats
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
        write_json_atomic(work.root / "prune" / "blocks" / f"{i:03d}.json", {"block": i, "matrices": rows})
        path = work.block_path("pruned", i)
        work.record_file(path, save_tensors_atomic(path, state))  # the block is done once this is recorded
        if sparse_stream and i > 0 and not cfg.keep_cache:
            work.forget_file(work.boundary_path("pruned", i))
        return rows


def _dtype_of(rows: TensorRows) -> torch.dtype:
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[rows.dtype]


def _skipped(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name.rsplit(".", 1)[-1], p) for p in patterns)


def build_report(work: WorkDir, n: int, criterion: str, pattern: Pattern, cfg: PruneConfig) -> dict:
    """prune/report.json: achieved sparsity of every matrix, of all pruned matrices, and of the whole model."""
    matrices = []
    for i in range(n):
        matrices += read_json(work.root / "prune" / "blocks" / f"{i:03d}.json")["matrices"]
    zeros = sum(m["zeros"] for m in matrices)
    total_linear = sum(m["shape"][0] * m["shape"][1] for m in matrices)
    total_params = sum(count_params(work.block_path("pruned", i)) for i in range(n))
    total_params += count_params(work.model_dir("dense") / "rest.safetensors")
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
    write_json_atomic(work.root / "prune" / "report.json", report)
    return report

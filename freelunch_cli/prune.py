"""Stage 2: prune every decoder block's linear layers, one block at a time, and report the sparsity."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import asdict, dataclass, field

import torch

from freelunch_cli.arch import block_linears
from freelunch_cli.console import Reporter
from freelunch_cli.criteria import get_criterion
from freelunch_cli.errors import FreelunchError
from freelunch_cli.faults import checkpoint
from freelunch_cli.masks import Pattern, check_fits, keep_mask, parse_pattern
from freelunch_cli.runtime import dtype_name, parse_dtype, pick_device
from freelunch_cli.skeleton import Skeleton, run_block
from freelunch_cli.stats import StatsCollector
from freelunch_cli.storage import TensorRows, count_params, load_tensors, read_json, save_tensors_atomic, write_json_atomic
from freelunch_cli.workdir import WorkDir, stage_lock


@dataclass
class PruneConfig:
    criterion: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str | None = None  # "N:M" or None for unstructured
    scope: str | None = None  # "row" | "matrix"; None: the criterion's default
    skip: list[str] = field(default_factory=list)  # fnmatch patterns of matrix names left dense
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 8

    def resolved(self) -> tuple[Pattern, object]:
        crit = get_criterion(self.criterion)
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
        "dtype": dtype_name(compute),
    }
    with stage_lock(work, "prune"):
        state = work.begin("prune", signature, resume, force)
        if state == "done":
            s = work.stage("prune").summary
            rep.summary(f"prune already done in {work.root}", s)
            return s
        t0 = time.time()
        sk = Skeleton.from_work(work, "dense", device, compute)
        n = sk.num_blocks
        samples = calib.summary["samples"]
        report_path = work.root / "prune" / "blocks"
        files = work.manifest()["files"]
        todo = [i for i in range(n) if work.rel(work.block_path("pruned", i)) not in files]
        rep.info(f"prune: {crit.name}, {pattern.describe()}, {n} blocks ({n - len(todo)} already done)")
        with rep.progress("prune", total=n, completed=n - len(todo)) as bar:
            for i in todo:
                t_block = time.time()
                state_dict = load_tensors(work.stage_block_path("dense", i))
                block = sk.build_block(i, state_dict)
                linears = {k: v for k, v in block_linears(block).items() if not _skipped(k, cfg.skip)}
                for name, lin in linears.items():
                    check_fits(pattern, tuple(lin.weight.shape), f"block {i} {name}")
                stats = None
                if crit.needs:
                    inputs = TensorRows(work.check_file(work.boundary_path("dense", i)))
                    collector = StatsCollector(linears, hessian_for=set(linears) if crit.needs == "hessian" else set())
                    with torch.no_grad(), collector:
                        for s in range(0, samples, cfg.batch_size):
                            x = inputs.rows(s, min(s + cfg.batch_size, samples)).to(device, compute)
                            run_block(block, x, sk.block_call(i, x.shape[0], x.shape[1]))
                    stats = collector.stats
                masks, rows = {}, []
                for name, lin in linears.items():
                    w = state_dict[f"{name}.weight"]
                    keep = keep_mask(crit.score(w.to(device), stats[name] if stats else None, cfg), pattern).cpu()
                    state_dict[f"{name}.weight"] = w * keep.to(w.dtype)
                    masks[name] = keep
                    zeros = int((~keep).sum())
                    rows.append({"block": i, "name": name, "shape": list(w.shape), "zeros": zeros, "sparsity": zeros / keep.numel()})
                info = save_tensors_atomic(work.mask_path(i), masks)
                work.record_file(work.mask_path(i), info)
                write_json_atomic(report_path / f"{i:03d}.json", {"block": i, "matrices": rows, "seconds": time.time() - t_block})
                path = work.block_path("pruned", i)
                work.record_file(path, save_tensors_atomic(path, state_dict))
                checkpoint("prune.block")
                frac = sum(r["zeros"] for r in rows) / max(sum(r["shape"][0] * r["shape"][1] for r in rows), 1)
                rep.info(f"  block {i:3d}: {frac:.4f} of its linear weights pruned in {time.time() - t_block:.1f}s")
                bar.advance()
        report = build_report(work, n, crit.name, pattern, cfg)
        summary = {
            "work": str(work.root),
            "criterion": crit.name,
            "pattern": pattern.describe(),
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
        "sparsity_linear": zeros / max(total_linear, 1),
        "sparsity_model": zeros / max(total_params, 1),
        "zeros": zeros,
        "matrices": matrices,
    }
    write_json_atomic(work.root / "prune" / "report.json", report)
    return report

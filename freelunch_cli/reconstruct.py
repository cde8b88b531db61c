"""Stage 3: local reconstruction, one window at a time, resumable per window, shared by any number of workers.

Scheduling lives here (shards, claims, assembly, cache cleanup, ``--window auto``, ``--status``); what a
window does is in ``window_runner.py``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict

import torch

from freelunch_cli.arch import block_halves, block_linears
from freelunch_cli.console import Reporter
from freelunch_cli.errors import FreelunchError
from freelunch_cli.faults import checkpoint
from freelunch_cli.recon_config import ReconstructConfig
from freelunch_cli.runtime import parse_dtype, pick_device
from freelunch_cli.scheduler import Claims, detect_shard
from freelunch_cli.skeleton import Skeleton
from freelunch_cli.storage import read_json
from freelunch_cli.window_runner import Reconstructor, window_done, window_index_done, window_params_path
from freelunch_cli.windows import Window, enumerate_windows
from freelunch_cli.workdir import Busy, WorkDir, locked_file, stage_lock

__all__ = ["ReconstructConfig", "reconstruct", "reconstruct_status", "show_status"]


def plan_windows(work: WorkDir, window: str) -> list[Window]:
    calib = work.require_done("calibrate", "reconstruct")
    kind = window.strip().lower()
    matrices = None
    if kind in ("matrix", "submodule"):
        template = Skeleton.from_work(work, "dense", "cpu", torch.float32).templates[0]
        matrices = list(block_linears(template))
        if kind == "submodule":
            block_halves(template, calib.summary["model_type"])  # refuses blocks without attention/MLP halves
    return enumerate_windows(calib.summary["num_blocks"], window, matrices)


def reconstruct(work: WorkDir, cfg: ReconstructConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False) -> dict:
    """Run (this process's share of) the windows; the worker that sees every window done assembles the model."""
    rep = rep or Reporter(quiet=True)
    cfg.validate()
    compute = parse_dtype(cfg.dtype)
    device = pick_device(cfg.device)
    shard = detect_shard(cfg.shard)
    if shard is not None and cfg.inputs == "sparse":
        raise FreelunchError("--inputs sparse chains windows in order and cannot be sharded; use --inputs dense with --shard")
    if shard is not None and force:
        raise FreelunchError("--force cannot be combined with sharded workers (each would start over); run "
                             "`freelunch reconstruct --prepare --force ...` once, then start the workers")
    pruned = work.require_done("prune", "reconstruct")
    cfg = resolve_auto_window(work, cfg, device, rep)
    windows = plan_windows(work, cfg.window)
    signature = {"prune_run": pruned.run_id, **cfg.signature()}
    with stage_lock(work, "reconstruct", shared=shard is not None):
        state = work.begin("reconstruct", signature, resume or shard is not None, force)
        if state == "done":
            return work.report_done("reconstruct", rep)
        work.set_progress("reconstruct", "windows_total", len(windows))
        if cfg.prepare:
            rep.summary(f"reconstruct prepared in {work.root}: {len(windows)} {cfg.window} windows; start the workers", {"windows": len(windows)})
            return {"windows": len(windows), "prepared": True}
        t0 = time.time()
        rc = Reconstructor(work, cfg, windows, device, compute)
        claims = Claims(work.root / "windows", cfg.stale_after if shard is not None else 0.0)
        mine = [w for w in windows if shard is None or shard.owns(w.index)]
        order = mine + [w for w in windows if w not in mine]  # then help with the rest (dead or slow workers)
        done_before = sum(window_done(work, w) for w in windows)
        who = f"shard {shard.index}/{shard.count} ({shard.source}), " if shard else ""
        rep.info(f"reconstruct: {who}{len(windows)} {cfg.window} windows ({done_before} already done), {cfg.inputs} inputs, "
                 f"{cfg.peft}; lr {cfg.lr}, {cfg.steps or cfg.epochs} {'steps' if cfg.steps else 'epoch(s)'}, batch {cfg.batch_size}, "
                 f"loss {cfg.loss}")
        ran = []
        with rep.progress("reconstruct", total=len(windows), completed=done_before) as bar:
            while True:
                progressed = False
                for win in order:
                    if window_done(work, win):
                        continue
                    attempt = claims.try_claim(win.index)
                    if attempt is None:
                        continue
                    with claims.heartbeat(win.index, attempt):
                        rec = rc.run(win, claims, attempt)
                    progressed = True
                    if rec is None:
                        rep.info(f"  window {win.index:3d} was taken over by another worker; its result is theirs")
                        continue
                    ran.append(win.index)
                    rep.info(f"  window {win.index:3d} ({win.label()}): loss {rec['loss_before']:.4g} -> {rec['loss_after']:.4g} "
                             f"in {rec['seconds']:.1f}s" + (f" (attempt {attempt})" if attempt > 1 else ""))
                    checkpoint("reconstruct.window")
                    bar.advance()
                    if not cfg.keep_cache:
                        drop_unneeded_boundaries(work, windows)
                if all(window_done(work, w) for w in windows):
                    break
                if not progressed:  # the rest is claimed by live workers: wait, and take over if one dies
                    time.sleep(max(0.2, min(5.0, cfg.stale_after / 4)))
        summary = finish_reconstruct(work, rc, windows, cfg, t0, ran)
    if summary is None:
        rep.summary(f"this worker ran windows {ran or 'none'}; another worker is assembling the model", {"ran": ran})
        return {"ran": ran, "assembled": False}
    rep.summary(f"reconstructed {len(windows)} {cfg.window} windows: summed loss {summary['loss_before']:.4g} -> "
                f"{summary['loss_after']:.4g} in {summary['seconds']:.1f}s", summary)
    return summary


def finish_reconstruct(work: WorkDir, rc: Reconstructor, windows: list[Window], cfg: ReconstructConfig, t0: float, ran: list[int]):
    """Assemble the blocks and mark the stage done, once (the first worker to get here does it)."""
    try:
        with locked_file(work.root / ".assemble.lock", blocking=False):
            if work.stage("reconstruct").status == "done":
                return work.stage("reconstruct").summary
            rc.assemble()
            records = [read_json(work.window_record_path(w.index)) for w in windows]
            summary = {
                "work": str(work.root),
                "window": cfg.window,
                "windows": len(windows),
                "loss_before": sum(r["loss_before"] for r in records),
                "loss_after": sum(r["loss_after"] for r in records),
                "trainable_params": sum(r["trainable_params"] for r in records),
                "seconds": round(time.time() - t0, 2),
                "window_seconds": round(sum(r["seconds"] for r in records), 2),
                "workers": sorted({r.get("worker", "?") for r in records}),
                "ran_here": ran,
                "config": asdict(cfg),
            }
            if cfg.inputs == "sparse" and not cfg.keep_cache:
                shutil.rmtree(work.acts_dir / "recon", ignore_errors=True)
            work.finish("reconstruct", summary)
            if not cfg.keep_cache:  # the assembled blocks hold them: a second copy of every trained weight
                work.forget([work.rel(window_params_path(work, w.index)) for w in windows])
            return summary
    except Busy:
        return None


def needed_boundaries(win: Window) -> set[int]:
    """Dense boundaries a window reads (inputs, targets, or the block it recomputes dense targets with)."""
    return {win.first, win.last + 1} if win.part is None else {win.first, win.first + 1}


def drop_unneeded_boundaries(work: WorkDir, windows: list[Window]) -> None:
    """Delete dense activation files no unfinished window needs. Their manifest records stay, so a later
    `calibrate --resume` recomputes them if another reconstruction needs them."""
    needed = set().union(*(needed_boundaries(w) for w in windows if not window_done(work, w)))
    for b in range(max(w.last for w in windows) + 2):
        if b not in needed:
            work.boundary_path("dense", b).unlink(missing_ok=True)


def resolve_auto_window(work: WorkDir, cfg: ReconstructConfig, device, rep: Reporter) -> ReconstructConfig:
    """``--window auto``: the largest window whose estimated memory fits ``--max-memory``."""
    from dataclasses import replace

    from freelunch_cli.memory import block_numbers, choose_window, parse_memory

    if cfg.window != "auto":
        return cfg
    if not cfg.max_memory:
        raise FreelunchError("--window auto needs --max-memory (e.g. 40GiB, or 0.8 of the device)")
    calib = work.stage("calibrate")
    sk = Skeleton.from_work(work, "dense", "cpu", torch.float32)
    nums = block_numbers(sk.config, sk.templates[0])
    budget = parse_memory(cfg.max_memory, torch.device(device))
    act_bytes = torch.tensor([], dtype=parse_dtype(cfg.dtype)).element_size()
    chosen, table = choose_window(calib.summary["num_blocks"], nums, cfg.batch_size, calib.summary["seqlen"], budget, act_bytes)
    gib = 2**30
    rep.table(f"memory estimate per window (batch {cfg.batch_size} x {calib.summary['seqlen']} tokens, budget {budget / gib:.2f} GiB)",
              ["window", "trainable params", "weights+grads+AdamW", "activations", "batch in/out", "dense copy", "total", "fits"],
              [[t["window"], f"{t['trainable_params'] / 1e6:.1f}M", f"{t['weights_grads_adam'] / gib:.2f} GiB", f"{t['activations'] / gib:.2f} GiB",
                f"{t['batch_io'] / gib:.2f} GiB", f"{t['frozen_dense'] / gib:.2f} GiB", f"{t['total'] / gib:.2f} GiB", "yes" if t["fits"] else "no"]
               for t in table])
    rep.info(f"--window auto: {chosen}")
    return replace(cfg, window=chosen)


def reconstruct_status(work: WorkDir, stale_after: float = 300.0) -> dict:
    """Done / running / stale / pending windows, for watching a cluster run."""
    work.require_done("prune", "reconstruct --status")
    st = work.stage("reconstruct")
    if st is None:
        return {"status": "not started", "done": [], "running": [], "stale": [], "pending": []}
    total = work.progress("reconstruct").get("windows_total", 0)
    claims = Claims(work.root / "windows", stale_after)
    out = {"status": st.status, "window": st.signature.get("window"), "done": [], "running": [], "stale": [], "pending": []}
    for i in range(total):
        if window_index_done(work, i):
            out["done"].append(i)
            continue
        cur = claims.current(i)
        if cur is None:
            out["pending"].append(i)
        elif cur[2] < stale_after:
            out["running"].append({"window": i, "worker": cur[1].get("worker"), "attempt": cur[0], "heartbeat_age": round(cur[2], 1)})
        else:
            out["stale"].append({"window": i, "worker": cur[1].get("worker"), "attempt": cur[0], "heartbeat_age": round(cur[2], 1)})
    return out


def show_status(work: WorkDir, stale_after: float, rep: Reporter) -> dict:
    st = reconstruct_status(work, stale_after)
    rows = [["done", len(st["done"]), _ranges(st["done"])], ["running", len(st["running"]), ", ".join(f"{r['window']} ({r['worker']})" for r in st["running"])],
            ["stale", len(st["stale"]), ", ".join(f"{r['window']} ({r['worker']}, {r['heartbeat_age']:.0f}s)" for r in st["stale"])],
            ["pending", len(st["pending"]), _ranges(st["pending"])]]
    rep.table(f"reconstruct in {work.root}: {st['status']}", ["windows", "count", "which"], rows)
    rep.summary(f"{len(st['done'])} done, {len(st['running'])} running, {len(st['stale'])} stale, {len(st['pending'])} pending", st)
    return st


def _ranges(indices: list[int]) -> str:
    out, i = [], 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        out.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ", ".join(out)

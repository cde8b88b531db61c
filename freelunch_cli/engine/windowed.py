"""The engine of every windowed stage (reconstruct, quantize): plan the windows, run this worker's share of them
under claims, and assemble the model once every window is done.

What a window is lives in ``reconstruction.windows``; what running one does (its modules, data, training, files) in
``engine.runner``; how workers share windows in ``engine.claims``. A stage gives the engine its ``WindowJob`` and
options (``configs.WindowedOptions``) and gets back the stage summary.
"""

from __future__ import annotations

import shutil
import time

import torch

from freelunch_cli.core.console import Reporter
from freelunch_cli.core.device import parse_dtype
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.kill_points import kill_point
from freelunch_cli.engine.boundaries import restore_dense_boundaries
from freelunch_cli.engine.claims import Claims, claim_in_turn, own_first, wait_seconds
from freelunch_cli.engine.records import window_done
from freelunch_cli.engine.runner import WindowJob, WindowRunner
from freelunch_cli.model.arch import block_halves, block_linears, check_halves
from freelunch_cli.model.skeleton import Skeleton, block_templates, float_call
from freelunch_cli.reconstruction.windows import Window, enumerate_windows
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import load_tensors, read_json
from freelunch_cli.workdir.locks import Busy, locked_file
from freelunch_cli.workdir.stage import StageRun, finished, open_stage


def plan_windows(work: WorkDir, window: str) -> list[Window]:
    """The windows of ``--window`` for this work directory's model; submodule windows only where the block's halves,
    composed, reproduce the block on calibration inputs (FreelunchError otherwise)."""
    calib = work.require_done("calibrate", "planning windows")
    kind = window.strip().lower()
    matrices = None
    if kind in ("matrix", "submodule"):
        template = block_templates(work)[1][0]  # from the config: no tensor read
        matrices = list(block_linears(template))
        if kind == "submodule":  # block 0 in float32 on a real call; embeddings and head stay in their stored dtype
            halves = block_halves(template, calib.summary["model_type"])
            sk = Skeleton.from_work(work, "dense", "cpu", parse_dtype(calib.summary.get("storage_dtype", "float32")))
            ids = load_tensors(work.check_file(work.tokens_path))["input_ids"][:2]  # never evicted, unlike boundary 0
            with torch.no_grad():
                x = sk.embed(ids).float()
            call = float_call(sk.block_call(0, *x.shape[:2]), torch.float32)
            check_halves(halves, sk.build_block(0, dtype=torch.float32), x, call, calib.summary["model_type"])
    return enumerate_windows(calib.summary["num_blocks"], window, matrices)


def run_windows(
    work: WorkDir,
    cfg,
    job: WindowJob,
    windows: list[Window],
    signature: dict,
    placement: tuple,
    shard,
    what: str,
    rep: Reporter,
    resume: bool,
    force: bool,
) -> dict:
    """Run (this process's share of) the windows of a windowed stage (reconstruct, quantize), shared with any number of
    workers through window claims; the worker that sees every window done assembles the model. ``placement``:
    (device, compute dtype); ``what``: what trains, for the log."""
    device, compute = placement
    if force:
        pending = windows
    elif finished(work, job.stage, signature):
        pending = []  # done with these options: nothing will run, so nothing is restored
    else:
        pending = [w for w in windows if not window_done(work, w.index, job.stage)] + _to_redo(work, job, windows)
    needed = set().union(*(w.dense_boundaries() for w in pending))
    if pending and cfg.inputs == "sparse":  # a chained input replayed from the start reads the embeddings' boundary
        needed.add(0)
    restore_dense_boundaries(work, needed, cfg.device, rep)  # deleted by an earlier windowed stage: recomputed
    for b in sorted(needed):  # before --force discards anything
        work.check_file(work.boundary_path("dense", b))
    with open_stage(
        work,
        job.stage,
        signature,
        rep,
        resume=resume or shard is not None,
        force=force,
        shared=shard is not None,
    ) as run:
        if run.done:
            return run.summary
        work.set_progress(job.stage, "windows_total", len(windows))
        if cfg.prepare:
            return run.report(
                f"{job.stage} prepared in {work.root}: {len(windows)} {cfg.window} windows; start the workers",
                {"windows": len(windows), "prepared": True},
            )
        for w in _to_redo(work, job, windows):  # their parameters are evicted: they run again
            work.forget([work.rel(work.window_params_path(w.index, job.stage))])
        runner = WindowRunner(work, cfg, windows, device, compute, job)
        claims = Claims(work.windows_dir(job.stage), cfg.stale_after if shard is not None else 0.0)
        by_index = {w.index: w for w in windows}
        done_before = sum(runner.done(w) for w in windows)
        who = f"shard {shard.index}/{shard.count} ({shard.source}), " if shard else ""
        rep.info(
            f"{job.stage}: {who}{len(windows)} {cfg.window} windows ({done_before} already done), {cfg.inputs} inputs, {what}"
        )
        ran = []
        released: dict[int, int] = {}  # windows this worker ran out of memory on: the attempt it gave up
        orphaned_since = None

        def check_released() -> None:
            nonlocal orphaned_since
            orphaned_since = _check_released(windows, runner, claims, released, orphaned_since)

        turns = claim_in_turn(
            own_first(list(by_index), shard),
            lambda i: runner.done(by_index[i]),
            claims,
            wait_seconds(cfg.stale_after),
            skip=released.__contains__,
            between=check_released,
        )
        with rep.progress(job.stage, total=len(windows), completed=done_before) as bar:
            for index, attempt in turns:
                win, oom = by_index[index], False
                claim = claims.held(win.index, attempt)
                kill_point(f"{job.stage}.claimed")  # tests: a worker suspended (STOP) or hung (HANG) right after claiming
                try:
                    rec = runner.run(win, claim)
                except torch.OutOfMemoryError:  # torch.cuda.OutOfMemoryError too
                    oom = True  # memory is freed below, once the exception (and the frames it holds) is gone
                if oom:
                    runner.release_memory()
                    claims.release(win.index, attempt)  # stale at once: another worker takes it over now
                    released[win.index] = attempt
                    rep.warn(f"window {win.index} ran out of memory on this worker ({claims.me}); released for the other workers")
                    continue
                if rec is None:
                    rep.info(f"  window {win.index:3d} was taken over by another worker; its result is theirs")
                    continue
                ran.append(win.index)
                rep.info(
                    f"  window {win.index:3d} ({win.label()}): loss {rec['loss_before']:.4g} -> {rec['loss_after']:.4g} "
                    f"in {rec['seconds']:.1f}s" + (f" (attempt {attempt})" if attempt > 1 else "") + _retry_note(rec)
                )
                kill_point(f"{job.stage}.window")
                bar.advance()
                if not cfg.keep_cache:
                    drop_unneeded_boundaries(work, windows, job.stage)
        return finish_windows(run, runner, windows, cfg, ran, shard)


def _to_redo(work: WorkDir, job: WindowJob, windows: list[Window]) -> list[Window]:
    """Finished windows whose parameters were evicted (the assembled blocks held them) and one of whose blocks is now
    missing or damaged: to write the block again they run again."""
    return [
        w
        for w in windows
        if work.is_evicted(work.window_params_path(w.index, job.stage))
        and any(work.problem(work.block_path(job.output, i)) is not None for i in w.blocks)
    ]


def _check_released(windows: list[Window], runner: WindowRunner, claims: Claims, released: dict, since: float | None):
    """When every unfinished window is one this worker released (out of memory) and no live worker has taken it over
    for ``stale_after`` seconds (at once without sharding), raise a FreelunchError naming them; else when that began."""
    left = [w for w in windows if not runner.done(w)]
    if not left or any(w.index not in released or claims.taken_over(w.index, released[w.index]) for w in left):
        return None
    since = since or time.time()
    if time.time() - since >= claims.stale_after:
        names = ", ".join(str(w.index) for w in left)
        raise FreelunchError(
            f"window{'s' if len(left) > 1 else ''} {names} ran out of memory on this worker and no other worker took "
            f"{'them' if len(left) > 1 else 'it'} over; use a smaller "
            f"--window (e.g. submodule), a smaller --batch-size or a larger device, then rerun with --resume"
        )
    return since


def finish_windows(run: StageRun, runner: WindowRunner, windows: list[Window], cfg, ran: list[int], shard=None) -> dict:
    """Assemble the blocks, shared by the workers (``assemble_blocks``), and mark the stage done, once: the first worker
    to get here waits for the blocks the others are writing and finishes; the others report what they did."""
    work, job = run.work, runner.job
    mine = assemble_blocks(work, runner, shard, wait=False)  # this worker's share of the blocks, then any free one
    try:
        with locked_file(work.lock_path("assemble" if job.stage == "reconstruct" else f"assemble-{job.stage}"), blocking=False):
            if work.stage(job.stage).status == "done":
                summary = work.stage(job.stage).summary
                return run.report(_summary_line(summary), summary)
            mine += assemble_blocks(work, runner, shard, wait=True)  # those other workers are writing: wait for them
            records = [read_json(work.window_record_path(w.index, job.stage)) for w in windows]
            summary = {
                "work": str(work.root),
                "stage": job.stage,
                "window": cfg.window,
                "windows": len(windows),
                "loss_before": sum(r["loss_before"] for r in records),
                "loss_after": sum(r["loss_after"] for r in records),
                "trainable_params": sum(r["trainable_params"] for r in records),
                "seconds": round(run.seconds(), 2),
                "window_seconds": round(sum(r["seconds"] for r in records), 2),
                "workers": sorted({r.get("worker", "?") for r in records}),
                "windows_retried": [i for i, r in enumerate(records) if r.get("rejected") and not r.get("kept_start")],
                "windows_kept_start": [i for i, r in enumerate(records) if r.get("kept_start")],
                "ran_here": ran,
                "assembled_here": sorted(mine),
            }
            if cfg.inputs == "sparse" and not cfg.keep_cache:  # the chained stream, records and files
                work.forget([rel for rel in work.manifest()["files"] if rel.startswith(f"acts/{job.stream}/")])
                shutil.rmtree(work.acts_dir / job.stream, ignore_errors=True)
            summary = run.finish(summary, _summary_line(summary), config=cfg)
            if not cfg.keep_cache:  # the assembled blocks hold them: a second copy of every trained weight
                work.evict([runner.params_path(w) for w in windows])
            return summary
    except Busy:
        return run.report(
            f"this worker ran windows {ran or 'none'} and wrote blocks {sorted(mine) or 'none'}; another worker finishes "
            f"the model",
            {"ran": ran, "assembled_here": sorted(mine), "assembled": False},
        )


def assemble_blocks(work: WorkDir, runner: WindowRunner, shard, wait: bool) -> list[int]:
    """Write the model's blocks that are not written yet, each under its own lock, this worker's share first (block
    ``i`` is shard ``i mod N``'s), then the others; with ``wait``, wait for blocks another worker is writing (and
    write them should it have died), else skip them. Every worker that finishes its windows takes part, so the
    model's writes are spread over the workers. Returns the blocks written here."""
    written = []
    for i in own_first(list(range(runner.sk.num_blocks)), shard):
        if runner.assembled(i):
            continue
        lock = work.lock_path(f"assemble-{runner.job.stage}-{i:03d}")
        try:
            with locked_file(lock, blocking=wait):
                if not runner.assembled(i):
                    runner.assemble_block(i)
                    written.append(i)
        except Busy:
            continue
    return written


def _summary_line(summary: dict) -> str:
    done = "quantized" if summary.get("stage") == "quantize" else "reconstructed"
    retried, kept = summary.get("windows_retried"), summary.get("windows_kept_start")
    return (
        f"{done} {summary['windows']} {summary['window']} windows: summed loss {summary['loss_before']:.4g} -> "
        f"{summary['loss_after']:.4g} in {summary['seconds']:.1f}s"
        + (f"; windows {_ids(retried)} retried at a lower rate (their held-out loss rose)" if retried else "")
        + (f"; windows {_ids(kept)} kept their starting weights (their held-out loss rose at every rate)" if kept else "")
    )


def _ids(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:12])) + (f" and {len(indices) - 12} more" if len(indices) > 12 else "")


def _retry_note(rec: dict) -> str:
    """What a window's record says of attempts given up because its held-out loss rose (``training.loop.train_window``)."""
    if not rec.get("rejected"):
        return ""
    tried = ", ".join(f"{r['lr']:.3g}" + (" diverged" if r["loss"] is None else f" -> {r['loss']:.4g}") for r in rec["rejected"])
    if rec.get("kept_start"):
        return f"; its {rec['guard']} loss rose at every rate (lr {tried}): kept its starting weights"
    return f"; its {rec['guard']} loss rose at lr {tried}: kept lr {rec['lr']:.3g}"


def drop_unneeded_boundaries(work: WorkDir, windows: list[Window], stage: str = "reconstruct") -> None:
    """Evict the dense activation files no unfinished window needs: deleted, their records kept and marked evicted, so
    calibrate stays complete and a later stage that needs one recomputes it (``restore_dense_boundaries``)."""
    needed = set().union(*(w.dense_boundaries() for w in windows if not window_done(work, w.index, stage)))
    paths = [work.boundary_path("dense", b) for b in range(max(w.last for w in windows) + 2) if b not in needed]
    work.evict([p for p in paths if p.exists()])

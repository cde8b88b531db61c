"""Stage 3: local reconstruction, one window at a time, resumable per window, shared by any number of workers.

What is reconstruct's own lives here (``--window auto``, ``--status``); planning, claims, running windows, assembly and
cache eviction are the engine's (``engine.windowed.run_windows``, shared with quantize, which brings its own
``WindowJob``). What a window does is in ``engine.runner`` and ``reconstruction.windows``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from freelunch_cli.configs.stage_configs import ReconstructConfig
from freelunch_cli.core.console import Reporter
from freelunch_cli.core.device import dtype_name, parse_dtype, resolve
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.engine.claims import Claims, detect_shard
from freelunch_cli.engine.records import window_done
from freelunch_cli.engine.runner import RECONSTRUCT
from freelunch_cli.engine.windowed import plan_windows, run_windows
from freelunch_cli.model.skeleton import block_templates
from freelunch_cli.reconstruction.memory import block_numbers, choose_window, parse_memory
from freelunch_cli.workdir.directory import WorkDir


def reconstruct(
    work: WorkDir, cfg: ReconstructConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False
) -> dict:
    """Run (this process's share of) the windows; the worker that sees every window done assembles the model.

    Returns the stage summary, or, for a worker that finished its windows while another assembles, what it ran.
    """
    rep = rep or Reporter(quiet=True)
    cfg.validate()
    device, compute = resolve(cfg.device, cfg.dtype)
    cfg = replace(cfg, dtype=dtype_name(compute))  # recorded as run
    shard = detect_shard(cfg.shard)
    if shard is not None and cfg.inputs == "sparse":
        raise FreelunchError("--inputs sparse chains windows in order and cannot be sharded; use --inputs dense with --shard")
    if shard is not None and force:
        raise FreelunchError(
            "--force cannot be combined with sharded workers (each would start over); run "
            "`freelunch reconstruct --prepare --force ...` once, then start the workers"
        )
    pruned = work.require_done("prune", "reconstruct")
    cfg = resolve_auto_window(work, cfg, device, rep)
    windows = plan_windows(work, cfg.window)
    what = (
        f"{cfg.peft}; {cfg.describe_rate()}, {cfg.steps or cfg.epochs} {'steps' if cfg.steps else 'epoch(s)'}, batch {cfg.batch_size}, "
        f"loss {cfg.loss}"
    )
    return run_windows(
        work, cfg, RECONSTRUCT, windows, cfg.signature(pruned.run_id), (device, compute), shard, what, rep, resume, force
    )


def resolve_auto_window(work: WorkDir, cfg: ReconstructConfig, device, rep: Reporter) -> ReconstructConfig:
    """``--window auto``: the largest window whose estimated memory fits ``--max-memory``."""
    if cfg.window != "auto":
        return cfg
    if not cfg.max_memory:
        raise FreelunchError("--window auto needs --max-memory (e.g. 40GiB, or 0.8 of the device)")
    calib = work.stage("calibrate")
    config, templates = block_templates(work)  # from the config: no tensor read
    nums = block_numbers(config, templates[0])
    budget = parse_memory(cfg.max_memory, torch.device(device))
    act_bytes = torch.tensor([], dtype=parse_dtype(cfg.dtype)).element_size()
    chosen, table = choose_window(calib.summary["num_blocks"], nums, cfg.batch_size, calib.summary["seqlen"], budget, act_bytes)
    gib = 2**30
    rep.table(
        f"memory estimate per window (batch {cfg.batch_size} x {calib.summary['seqlen']} tokens, budget {budget / gib:.2f} GiB)",
        ["window", "trainable params", "weights+grads+AdamW", "activations", "batch in/out", "dense copy", "total", "fits"],
        [
            [
                t["window"],
                f"{t['trainable_params'] / 1e6:.1f}M",
                f"{t['weights_grads_adam'] / gib:.2f} GiB",
                f"{t['activations'] / gib:.2f} GiB",
                f"{t['batch_io'] / gib:.2f} GiB",
                f"{t['frozen_dense'] / gib:.2f} GiB",
                f"{t['total'] / gib:.2f} GiB",
                "yes" if t["fits"] else "no",
            ]
            for t in table
        ],
    )
    rep.info(f"--window auto: {chosen}")
    return replace(cfg, window=chosen)


def reconstruct_status(work: WorkDir, stale_after: float = 300.0) -> dict:
    """Done / running / stale / pending windows, for watching a cluster run."""
    work.require_done("prune", "reconstruct --status")
    st = work.stage("reconstruct")
    if st is None:
        return {"status": "not started", "done": [], "running": [], "stale": [], "pending": []}
    total = work.progress("reconstruct").get("windows_total", 0)
    claims = Claims(work.windows_dir(), stale_after)
    out = {"status": st.status, "window": st.signature.get("window"), "done": [], "running": [], "stale": [], "pending": []}
    for i in range(total):
        if window_done(work, i):
            out["done"].append(i)
            continue
        cur = claims.current(i)
        if cur is None:
            out["pending"].append(i)
        elif cur[2] < stale_after:
            out["running"].append(
                {"window": i, "worker": cur[1].get("worker"), "attempt": cur[0], "heartbeat_age": round(cur[2], 1)}
            )
        else:
            out["stale"].append(
                {"window": i, "worker": cur[1].get("worker"), "attempt": cur[0], "heartbeat_age": round(cur[2], 1)}
            )
    return out


def show_status(work: WorkDir, stale_after: float, rep: Reporter) -> dict:
    st = reconstruct_status(work, stale_after)
    rows = [
        ["done", len(st["done"]), _ranges(st["done"])],
        ["running", len(st["running"]), ", ".join(f"{r['window']} ({r['worker']})" for r in st["running"])],
        ["stale", len(st["stale"]), ", ".join(f"{r['window']} ({r['worker']}, {r['heartbeat_age']:.0f}s)" for r in st["stale"])],
        ["pending", len(st["pending"]), _ranges(st["pending"])],
    ]
    rep.table(f"reconstruct in {work.root}: {st['status']}", ["windows", "count", "which"], rows)
    rep.summary(
        f"{len(st['done'])} done, {len(st['running'])} running, {len(st['stale'])} stale, {len(st['pending'])} pending", st
    )
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

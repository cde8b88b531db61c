"""Stage 3: local reconstruction, one window at a time, resumable per window."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from freelunch_cli.console import Reporter
from freelunch_cli.errors import FreelunchError
from freelunch_cli.faults import checkpoint
from freelunch_cli.runtime import dtype_name, free_memory, parse_dtype, pick_device
from freelunch_cli.skeleton import Skeleton, run_block
from freelunch_cli.storage import TensorRows, load_tensors, read_json, save_tensors_atomic, write_json_atomic
from freelunch_cli.train import MaskedParams, TrainConfig, loss_fn, train_window
from freelunch_cli.windows import Window, enumerate_windows
from freelunch_cli.workdir import WorkDir, stage_lock


@dataclass
class ReconstructConfig:
    window: str = "block"
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 4
    seed: int = 0
    weight_decay: float = 0.0
    loss: str = "mse"
    device: str = "auto"
    dtype: str = "float32"

    def train_config(self, window_index: int) -> TrainConfig:
        # Each window gets its own seed so windows are independent and a resumed run matches.
        return TrainConfig(self.lr, self.epochs, self.batch_size, self.seed * 100_003 + window_index, self.weight_decay, self.loss)


class WindowModule(nn.Module):
    """Consecutive decoder blocks called with the arguments their model passes them."""

    def __init__(self, sk: Skeleton, blocks: dict[int, nn.Module]):
        super().__init__()
        self.sk = sk
        self.order = sorted(blocks)
        self.blocks = nn.ModuleList([blocks[i] for i in self.order])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in zip(self.order, self.blocks):
            x = run_block(block, x, self.sk.block_call(i, x.shape[0], x.shape[1]))
        return x


def load_window(work: WorkDir, sk: Skeleton, win: Window) -> tuple[WindowModule, MaskedParams, dict[int, dict]]:
    """The window's pruned blocks in float32 (trainable) and their masks."""
    blocks, masks_by_param, storage = {}, {}, {}
    for i in win.blocks:
        state = load_tensors(work.stage_block_path("pruned", i))
        storage[i] = {k: v.dtype for k, v in state.items()}
        block = sk.build_block(i, state, dtype=torch.float32)
        masks = load_tensors(work.check_file(work.mask_path(i)), device=sk.device)
        for name, keep in masks.items():
            masks_by_param[id(block.get_submodule(name).weight)] = keep
        blocks[i] = block
    module = WindowModule(sk, blocks)
    params = [p for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    return module, MaskedParams(params, masks_by_param), storage


def reconstruct(work: WorkDir, cfg: ReconstructConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False) -> dict:
    rep = rep or Reporter(quiet=True)
    loss_fn(cfg.loss)  # validate before any work
    if cfg.lr <= 0 or cfg.epochs < 1 or cfg.batch_size < 1:
        raise FreelunchError("--lr must be positive, --epochs and --batch-size at least 1")
    compute = parse_dtype(cfg.dtype)
    device = pick_device(cfg.device)
    pruned = work.require_done("prune", "reconstruct")
    calib = work.stage("calibrate")
    windows = enumerate_windows(calib.summary["num_blocks"], cfg.window)
    signature = {"prune_run": pruned.run_id, **asdict(cfg)}
    signature.pop("device")
    with stage_lock(work, "reconstruct"):
        state = work.begin("reconstruct", signature, resume, force)
        if state == "done":
            s = work.stage("reconstruct").summary
            rep.summary(f"reconstruct already done in {work.root}", s)
            return s
        work.set_progress("reconstruct", "windows_total", len(windows))
        t0 = time.time()
        sk = Skeleton.from_work(work, "pruned", device, compute)
        done = [w for w in windows if window_done(work, w)]
        rep.info(f"reconstruct: {len(windows)} {cfg.window} windows, {len(done)} already done; lr {cfg.lr}, {cfg.epochs} epoch(s), batch {cfg.batch_size}")
        with rep.progress("reconstruct", total=len(windows), completed=len(done)) as bar:
            for win in windows:
                if window_done(work, win):
                    continue
                rec = run_window(work, sk, win, cfg, device, compute)
                checkpoint("reconstruct.window")
                rep.info(
                    f"  window {win.index:3d} ({win.label()}): loss {rec['loss_before']:.4g} -> {rec['loss_after']:.4g} "
                    f"in {rec['seconds']:.1f}s"
                )
                bar.advance()
        records = [read_json(work.window_record_path(w.index)) for w in windows]
        summary = {
            "work": str(work.root),
            "window": cfg.window,
            "windows": len(windows),
            "loss_before": sum(r["loss_before"] for r in records),
            "loss_after": sum(r["loss_after"] for r in records),
            "seconds": round(time.time() - t0, 2),
            "config": asdict(cfg),
        }
        work.finish("reconstruct", summary)
    rep.summary(
        f"reconstructed {len(windows)} windows: summed loss {summary['loss_before']:.4g} -> {summary['loss_after']:.4g} "
        f"in {summary['seconds']:.1f}s",
        summary,
    )
    return summary


def window_done(work: WorkDir, win: Window) -> bool:
    p = work.window_record_path(win.index)
    return p.exists() and read_json(p).get("status") == "done"


def run_window(work: WorkDir, sk: Skeleton, win: Window, cfg: ReconstructConfig, device, compute) -> dict:
    """Train one window, write its blocks, then its record (the record is what marks it done)."""
    t0 = time.time()
    rec = {"window": win.as_dict(), "status": "running", "started": t0}
    write_json_atomic(work.window_record_path(win.index), rec)
    module, params, storage = load_window(work, sk, win)
    inputs = TensorRows(work.check_file(work.boundary_path("dense", win.input_boundary)))
    targets = TensorRows(work.check_file(work.boundary_path("dense", win.target_boundary)))
    total, free = params.count()
    result = train_window(module, params, inputs, targets, cfg.train_config(win.index), device, compute)
    for i, block in zip(module.order, module.blocks):
        state = {k: v.detach().to(storage[i][k]) for k, v in block.state_dict().items()}
        path = work.block_path("reconstructed", i)
        work.record_file(path, save_tensors_atomic(path, state))
    rec.update(result, status="done", seconds=time.time() - t0, trainable_params=total, trainable_nonzero=free)
    write_json_atomic(work.window_record_path(win.index), rec)
    del module, params
    free_memory(torch.device(device))
    return rec

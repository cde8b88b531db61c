"""Stage 3: local reconstruction, one window at a time, resumable per window.

Each window trains a copy of its pruned modules (initialised from the pruned shards) to match the dense
model at its end. It writes only its own files: ``recon/windows/NNN.safetensors`` (the parameters it
changed) and ``windows/NNN.json`` (its record; ``status: done`` marks it finished). Once every window is
done, the blocks are assembled into ``recon/block_NNN.safetensors``.

With ``--inputs sparse`` a window reads the output of the already-reconstructed windows before it (the
chained stream ``acts/recon``, stored so that a resumed run computes the same numbers); targets always
stay the dense model's activations.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from freelunch_cli.arch import block_halves, block_linears
from freelunch_cli.calibrate import write_activations
from freelunch_cli.console import Reporter
from freelunch_cli.errors import FreelunchError
from freelunch_cli.faults import checkpoint
from freelunch_cli.peft import PeftConfig, prepare, qualify
from freelunch_cli.runtime import dtype_name, free_memory, parse_dtype, pick_device
from freelunch_cli.skeleton import Skeleton, run_block
from freelunch_cli.stats import StopForward
from freelunch_cli.storage import TensorRows, load_tensors, read_json, save_tensors_atomic, write_json_atomic
from freelunch_cli.train import TrainConfig, train_window
from freelunch_cli.windows import Window, enumerate_windows, parse_granularity
from freelunch_cli.scheduler import Claims, detect_shard, worker_id
from freelunch_cli.workdir import WorkDir, Busy, locked_file, stage_lock

INPUT_MODES = ("dense", "sparse")


@dataclass
class ReconstructConfig:
    window: str = "block"
    inputs: str = "dense"
    peft: str = "full"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lr: float = 1e-4
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 4
    warmup: float = 0.0
    weight_decay: float = 0.0
    loss: str = "mse"
    grad_clip: float | None = None
    val_fraction: float = 0.0
    keep_best: bool = False
    seed: int = 0
    keep_cache: bool = False
    shard: str | None = None  # "I/N"; default from torchrun or a Slurm array
    stale_after: float = 300.0  # seconds without a heartbeat after which a claimed window is taken over
    max_memory: str | None = None  # for --window auto
    prepare: bool = False  # only set the stage up (for sharded workers started afterwards)
    device: str = "auto"
    dtype: str = "float32"

    def train_config(self, window_index: int) -> TrainConfig:
        # Each window gets its own seed so windows are independent and a resumed run matches.
        return TrainConfig(self.lr, self.epochs, self.batch_size, self.seed * 100_003 + window_index, self.weight_decay,
                           self.loss, self.steps, self.warmup, self.grad_clip, self.keep_best)

    def peft_config(self, window_index: int) -> PeftConfig:
        return PeftConfig(self.peft, self.lora_rank, self.lora_alpha, self.seed * 100_003 + window_index)

    def validate(self) -> None:
        if self.window != "auto":
            parse_granularity(self.window)
        if self.stale_after <= 0:
            raise FreelunchError("--stale-after must be positive")
        self.train_config(0).validate()
        self.peft_config(0).validate()
        if self.inputs not in INPUT_MODES:
            raise FreelunchError(f"--inputs must be dense or sparse, got {self.inputs!r}")
        if not 0 <= self.val_fraction < 1:
            raise FreelunchError("--val-fraction must be in [0, 1)")
        if self.keep_best and self.val_fraction == 0:
            raise FreelunchError("--keep-best needs validation samples: set --val-fraction")

    def signature(self) -> dict:
        sig = asdict(self)
        for k in ("device", "keep_cache", "shard", "stale_after", "max_memory", "prepare"):
            sig.pop(k)
        return sig


class Rows:
    """(input, target) batches: from stored activations, or computed per batch."""

    def __init__(self, fn):
        self.fn = fn

    def batch(self, idx):
        return self.fn(idx)


class Reconstructor:
    """Everything one window needs: shards, caches, the dense reference and the chained stream."""

    def __init__(self, work: WorkDir, cfg: ReconstructConfig, windows: list[Window], device, compute):
        self.work, self.cfg, self.windows, self.device, self.compute = work, cfg, windows, device, compute
        self.sk = Skeleton.from_work(work, "pruned", device, compute, rest_device="cpu")
        self.cache_dtype = parse_dtype(work.stage("calibrate").signature["cache_dtype"])
        self.samples = work.stage("calibrate").summary["samples"]
        self.storage_dtype = next(v.dtype for v in load_tensors(work.stage_block_path("pruned", 0)).values() if v.is_floating_point())
        self._dense: tuple[int, nn.Module] | None = None
        self.halves = None
        if any(w.part in ("attn", "mlp") for w in windows):
            self.halves = block_halves(self.sk.build_block(0), self.sk.config.model_type)
        perm = torch.randperm(self.samples, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_val = int(round(self.samples * cfg.val_fraction))
        if cfg.val_fraction and (n_val < 1 or n_val >= self.samples):
            raise FreelunchError(f"--val-fraction {cfg.val_fraction} of {self.samples} samples leaves no validation or no training samples")
        self.val_idx, self.train_idx = sorted(perm[:n_val]), sorted(perm[n_val:])

    # ---- state -------------------------------------------------------------------------------------
    def dense_block(self, i: int) -> nn.Module:
        if self._dense is None or self._dense[0] != i:
            self._dense = (i, self.sk.build_block(i, load_tensors(self.work.stage_block_path("dense", i))))
        return self._dense[1]

    def current_state(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``: the pruned shard, with the parameters of every finished window that touched it."""
        state = load_tensors(self.work.stage_block_path("pruned", i))
        for w in self.windows:
            if i in w.blocks and window_done(self.work, w):
                for k, v in load_tensors(self.work.check_file(window_params_path(self.work, w.index))).items():
                    b, _, name = k.partition("/")
                    if int(b) == i:
                        state[name] = v
        return state

    def call(self, i: int, x: torch.Tensor):
        return self.sk.block_call(i, x.shape[0], x.shape[1])

    # ---- activations -------------------------------------------------------------------------------
    def rows(self, stream: str, name: str) -> TensorRows:
        return TensorRows(self.work.check_file(self.work.root / "acts" / stream / f"{name}.safetensors"))

    def input_stream(self, b: int) -> str:
        return "recon" if self.cfg.inputs == "sparse" and b > 0 else "dense"

    def _load(self, rows: TensorRows, idx) -> torch.Tensor:
        return rows.take(idx).to(self.device, torch.float32)

    def dense_mid(self, i: int, x_dense: torch.Tensor) -> torch.Tensor:
        block = self.dense_block(i)
        with torch.no_grad():
            return self.halves.attention(block, x_dense.to(self.compute), self.call(i, x_dense)).float()

    def dense_matrix_io(self, i: int, name: str, x_dense: torch.Tensor):
        """The dense matrix's input and output inside dense block ``i``."""
        block = self.dense_block(i)
        return capture_linear_io(block, name, lambda: run_block(block, x_dense.to(self.compute), self.call(i, x_dense)))

    # ---- one window --------------------------------------------------------------------------------
    def run(self, win: Window, claims: Claims | None = None, attempt: int = 1) -> dict | None:
        """Train, then write the window's parameters and its record; None if another worker took it over."""
        t0 = time.time()
        work, cfg = self.work, self.cfg
        if cfg.inputs == "sparse":
            self.ensure_chain_input(win)
        rec = {"window": win.as_dict(), "status": "running", "started": t0, "worker": worker_id(), "attempt": attempt}
        write_json_atomic(work.window_record_path(win.index), rec)
        blocks = {}
        for i in win.blocks:
            state = self.current_state(i) if win.part else load_tensors(work.stage_block_path("pruned", i))
            if win.part:  # the window's own modules always start from the pruned weights
                pruned = load_tensors(work.stage_block_path("pruned", i))
                state.update({k: v for k, v in pruned.items() if self._in_scope(win, k)})
            blocks[i] = self.sk.build_block(i, state, dtype=torch.float32)
        masks = {}
        for i in win.blocks:
            for name, keep in load_tensors(work.check_file(work.mask_path(i)), device=self.device).items():
                masks[f"{i}/{name}"] = keep
        scope = self._scope(win, blocks)
        trainable = prepare(scope, {k: v for k, v in masks.items() if any(in_prefix(k, p) for p in scope)}, cfg.peft_config(win.index))
        forward, data = self._forward_and_data(win, blocks)
        total, free = trainable.params.count()
        result = train_window(forward, trainable.params, data, self.train_idx, self.val_idx, cfg.train_config(win.index),
                              self.device, self.compute)
        trainable.finalize()
        params = {}
        for prefix, module in scope.items():
            for k, v in module.state_dict().items():
                params[qualify(prefix, k)] = v.detach().to(self.storage_dtype) if v.is_floating_point() else v.detach()
        del blocks, scope, trainable, forward, data
        if claims is not None and not claims.still_mine(win.index, attempt):
            return None  # declared dead and taken over meanwhile: the new owner writes this window
        path = window_params_path(work, win.index)
        work.record_file(path, save_tensors_atomic(path, params))
        if cfg.inputs == "sparse":
            self._write_chain(win, params)
        rec.update(result, status="done", seconds=time.time() - t0, trainable_params=total, trainable_nonzero=free)
        write_json_atomic(work.window_record_path(win.index), rec)
        if cfg.inputs == "sparse" and not cfg.keep_cache:
            self._drop_chain_input(win)
        free_memory(torch.device(self.device))
        return rec

    def _in_scope(self, win: Window, key: str) -> bool:
        if win.part in ("attn", "mlp"):
            h = self.halves
            names = (h.attn_norm, h.attn) if win.part == "attn" else (h.mid_norm, *h.mlp)
            return any(key.startswith(n + ".") for n in names)
        return key.startswith(win.part + ".")

    def _scope(self, win: Window, blocks: dict[int, nn.Module]) -> dict[str, nn.Module]:
        """The window's trainable modules by qualified name ("block/module")."""
        if win.part is None:
            return {f"{i}/": b for i, b in blocks.items()}
        b = blocks[win.first]
        if win.part in ("attn", "mlp"):
            h = self.halves
            names = (h.attn_norm, h.attn) if win.part == "attn" else (h.mid_norm, *h.mlp)
            return {f"{win.first}/{n}": b.get_submodule(n) for n in names}
        return {f"{win.first}/{win.part}": b.get_submodule(win.part)}

    def _forward_and_data(self, win: Window, blocks: dict[int, nn.Module]):
        i, inp = win.first, self.input_stream(win.first)
        dense_in = self.rows("dense", f"boundary_{i:03d}")
        if win.part is None:
            src = self.rows(inp, f"boundary_{i:03d}")
            tgt = self.rows("dense", f"boundary_{win.last + 1:03d}")
            order = sorted(blocks)

            def forward(x):
                for j in order:
                    x = run_block(blocks[j], x, self.call(j, x))
                return x

            return forward, Rows(lambda idx: (self._load(src, idx), self._load(tgt, idx)))
        block = blocks[i]
        if win.part == "attn":
            src = self.rows(inp, f"boundary_{i:03d}")
            return (lambda x: self.halves.attention(block, x, self.call(i, x)),
                    Rows(lambda idx: (self._load(src, idx), self.dense_mid(i, self._load(dense_in, idx)))))
        if win.part == "mlp":
            tgt = self.rows("dense", f"boundary_{i + 1:03d}")
            if inp == "dense":
                data = Rows(lambda idx: (self.dense_mid(i, self._load(dense_in, idx)), self._load(tgt, idx)))
            else:
                mid = self.rows("recon", f"mid_{i:03d}")
                data = Rows(lambda idx: (self._load(mid, idx), self._load(tgt, idx)))
            return (lambda h: self.halves.feed_forward(block, h)), data
        linear = block.get_submodule(win.part)
        if inp == "dense":
            def data_fn(idx):
                x, y = self.dense_matrix_io(i, win.part, self._load(dense_in, idx))
                return x.float(), y.float()
        else:
            src = self.rows("recon", f"boundary_{i:03d}")

            def data_fn(idx):
                _, y = self.dense_matrix_io(i, win.part, self._load(dense_in, idx))
                xs = self._load(src, idx)
                x, _ = capture_linear_io(block, win.part, lambda: run_block(block, xs, self.call(i, xs)))
                return x.float(), y.float()

        return (lambda x: linear(x)), Rows(data_fn)

    # ---- the chained stream (--inputs sparse) -------------------------------------------------------------
    def _write_chain(self, win: Window, params: dict[str, torch.Tensor]) -> None:
        """Run the finished window, as it is stored, on its chained input; store the output for the next window."""
        i, path = win.first, self._chain_output(win)
        if path is None:
            return
        blocks = {}
        for j in win.blocks:
            state = self.current_state(j)
            state.update({k.partition("/")[2]: v for k, v in params.items() if int(k.partition("/")[0]) == j})
            blocks[j] = self.sk.build_block(j, state)
        if win.part == "mlp":
            src = self.rows("recon", f"mid_{i:03d}")
            fn = lambda x: self.halves.feed_forward(blocks[i], x)  # noqa: E731
        elif win.part == "attn":
            src = self.rows(self.input_stream(i), f"boundary_{i:03d}")
            fn = lambda x: self.halves.attention(blocks[i], x, self.call(i, x))  # noqa: E731
        else:
            src = self.rows(self.input_stream(i), f"boundary_{i:03d}")

            def fn(x):
                for j in sorted(blocks):
                    x = run_block(blocks[j], x, self.call(j, x))
                return x

        def producer(rows_slice):
            with torch.no_grad():
                return fn(src.rows(rows_slice.start, rows_slice.stop).to(self.device, self.compute))

        hidden, seqlen = self.sk.config.hidden_size, src.shape[1]
        write_activations(self.work, path, producer, self.samples, seqlen, hidden, self.cache_dtype, 8)

    def _chain_output(self, win: Window):
        """The chained file a window writes (None: it writes none)."""
        i, n = win.first, self.sk.num_blocks
        if win.part not in (None, "attn", "mlp") and win.index != [w for w in self.windows if w.first == i][-1].index:
            return None
        name = f"mid_{i:03d}" if win.part == "attn" else f"boundary_{win.last + 1:03d}"
        if win.part != "attn" and win.last + 1 >= n:
            return None
        return self.work.root / "acts" / "recon" / f"{name}.safetensors"

    def _chain_input(self, win: Window):
        if win.part == "mlp":
            return self.work.root / "acts" / "recon" / f"mid_{win.first:03d}.safetensors"
        if win.first == 0:
            return None  # the embeddings: the dense boundary 0
        return self.work.root / "acts" / "recon" / f"boundary_{win.first:03d}.safetensors"

    def ensure_chain_input(self, win: Window) -> None:
        """Recreate a deleted chained input by replaying the finished windows that produce it, as stored."""
        needed = self._chain_input(win)
        if needed is None or self.work.rel(needed) in self.work.manifest()["files"]:
            return
        producer = next(w for w in reversed(self.windows[: win.index]) if self._chain_output(w) == needed)
        self.ensure_chain_input(producer)
        self._write_chain(producer, load_tensors(self.work.check_file(window_params_path(self.work, producer.index))))

    def _drop_chain_input(self, win: Window) -> None:
        i = win.first
        if win.part == "mlp":
            self.work.forget_file(self.work.root / "acts" / "recon" / f"mid_{i:03d}.safetensors")
        if i > 0 and (win.part is None or win.part == "mlp" or win.index == [w for w in self.windows if w.first == i][-1].index):
            self.work.forget_file(self.work.root / "acts" / "recon" / f"boundary_{i:03d}.safetensors")

    # ---- assembly ----------------------------------------------------------------------------------
    def assemble(self) -> None:
        for i in range(self.sk.num_blocks):
            path = self.work.block_path("reconstructed", i)
            self.work.record_file(path, save_tensors_atomic(path, self.current_state(i)))


def in_prefix(key: str, prefix: str) -> bool:
    return key.startswith(prefix) if prefix.endswith("/") else key == prefix or key.startswith(prefix + ".")


def capture_linear_io(block: nn.Module, name: str, run):
    """Input and output of one linear layer during ``run()``; the rest of the block is skipped."""
    got = {}
    lin = block.get_submodule(name)

    def hook(mod, args, out):
        got["x"], got["y"] = args[0].detach(), out.detach()
        raise StopForward

    h = lin.register_forward_hook(hook)
    try:
        with torch.no_grad():
            run()
    except StopForward:
        pass
    finally:
        h.remove()
    return got["x"], got["y"]


def window_params_path(work: WorkDir, index: int):
    return work.root / "recon" / "windows" / f"{index:03d}.safetensors"


def window_done(work: WorkDir, win: Window) -> bool:
    """Done when its record says so and its parameter file is recorded (a damaged one was forgotten)."""
    p = work.window_record_path(win.index)
    if not p.exists():
        return False
    try:
        status = read_json(p).get("status")
    except FreelunchError:
        return False
    return status == "done" and work.rel(window_params_path(work, win.index)) in work.manifest()["files"]


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
            s = work.stage("reconstruct").summary
            rep.summary(f"reconstruct already done in {work.root}", s)
            return s
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
                shutil.rmtree(work.root / "acts" / "recon", ignore_errors=True)
            work.finish("reconstruct", summary)
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
        rec_path = work.window_record_path(i)
        rec = None
        if rec_path.exists():
            try:
                rec = read_json(rec_path)
            except FreelunchError:
                rec = None
        if rec is not None and rec.get("status") == "done" and work.rel(window_params_path(work, i)) in work.manifest()["files"]:
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

"""Running one reconstruction window: its modules, data, training, outputs and the chained stream.

Each window trains a copy of its pruned modules (initialised from the pruned shards) to match the dense
model at its end. It writes only its own files: ``recon/windows/NNN.safetensors`` (the parameters it
changed) and ``windows/NNN.json`` (its record; ``status: done`` marks it finished). Once every window is
done, the blocks are assembled into ``recon/block_NNN.safetensors``.

With ``--inputs sparse`` a window reads the output of the already-reconstructed windows before it (the
chained stream ``acts/recon``, stored so that a resumed run computes the same numbers); targets always
stay the dense model's activations.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from freelunch_cli.arch import block_halves
from freelunch_cli.calibrate import write_activations
from freelunch_cli.errors import FreelunchError
from freelunch_cli.peft import prepare, qualify
from freelunch_cli.recon_config import ReconstructConfig
from freelunch_cli.runtime import free_memory, parse_dtype
from freelunch_cli.scheduler import Claims, worker_id
from freelunch_cli.skeleton import Skeleton, run_block
from freelunch_cli.stats import StopForward
from freelunch_cli.storage import TensorRows, load_tensors, read_json, save_tensors_atomic, write_json_atomic
from freelunch_cli.train import train_window
from freelunch_cli.windows import Window
from freelunch_cli.workdir import WorkDir


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
        return TensorRows(self.work.check_file(self.work.act_path(stream, name)))

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

    def logit_loss(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``kl_weight`` · KL(dense ‖ reconstructed) of the next-token distributions, through the frozen final
        norm and head: aligns the last window with what perplexity measures."""
        with torch.no_grad():
            teacher = torch.log_softmax(self.sk.head(t).float(), dim=-1)
        student = torch.log_softmax(self.sk.head(y).float(), dim=-1)
        kl = torch.nn.functional.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean")
        return self.cfg.kl_weight * kl.to(y.device)

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
        extra = self.logit_loss if cfg.kl_weight > 0 and win.last == self.sk.num_blocks - 1 and win.part in (None, "mlp") else None
        result = train_window(forward, trainable.params, data, self.train_idx, self.val_idx, cfg.train_config(win.index),
                              self.device, self.compute, extra_loss=extra)
        if extra is not None:
            result["kl_weight"] = cfg.kl_weight
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
        return self.work.act_path("recon", name)

    def _chain_input(self, win: Window):
        if win.part == "mlp":
            return self.work.act_path("recon", f"mid_{win.first:03d}")
        if win.first == 0:
            return None  # the embeddings: the dense boundary 0
        return self.work.act_path("recon", f"boundary_{win.first:03d}")

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
            self.work.forget_file(self.work.act_path("recon", f"mid_{i:03d}"))
        if i > 0 and (win.part is None or win.part == "mlp" or win.index == [w for w in self.windows if w.first == i][-1].index):
            self.work.forget_file(self.work.act_path("recon", f"boundary_{i:03d}"))

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
    return window_index_done(work, win.index)


def window_index_done(work: WorkDir, index: int) -> bool:
    """Done when its record says so and its parameter file is recorded (a damaged one was forgotten), or, once the
    stage is done and the assembled blocks hold every window, when its record says so (the file was deleted)."""
    p = work.window_record_path(index)
    if not p.exists():
        return False
    try:
        status = read_json(p).get("status")
    except FreelunchError:
        return False
    if status != "done":
        return False
    if work.rel(window_params_path(work, index)) in work.manifest()["files"]:
        return True
    st = work.stage("reconstruct")
    return st is not None and st.status == "done"

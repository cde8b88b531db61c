"""Running one window of a windowed stage: its modules, data, training, outputs and the chained stream.

Each window trains a copy of its modules (initialised from the source model's shards: the pruned model for
reconstruct, any model for quantize) to match the dense model at its end. It writes only its own files:
``recon/windows/NNN.safetensors`` (the parameters it changed) and ``windows/NNN.json`` (its record; ``status:
done`` marks it finished). Once every window is done, the blocks are assembled into ``recon/block_NNN.safetensors``.
What a stage trains and where its files live is its ``WindowJob`` (quantize: ``quant/...``, through fake-quantizers).

With ``--inputs sparse`` a window reads the output of the already-reconstructed windows before it (the
chained stream ``acts/recon``, stored so that a resumed run computes the same numbers); targets always
stay the dense model's activations. What differs between window kinds is in ``reconstruction.windows``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from freelunch_cli.core.device import available_memory, dtype_name, free_memory, parse_dtype
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.kill_points import kill_point
from freelunch_cli.model.activations import write_activations
from freelunch_cli.model.arch import Halves, block_halves
from freelunch_cli.model.hooks import capture_linear_io
from freelunch_cli.model.moe import put_tensor
from freelunch_cli.model.skeleton import Skeleton, run_block
from freelunch_cli.reconstruction.claims import Claims, worker_id
from freelunch_cli.reconstruction.records import window_done
from freelunch_cli.reconstruction.windows import Window
from freelunch_cli.training.loop import train_window
from freelunch_cli.training.peft import prepare, qualify
from freelunch_cli.workdir.directory import WINDOW_STAGES
from freelunch_cli.workdir.files import TensorRows, load_tensors, save_tensors_atomic, write_json_atomic

QPARAMS = "qparams:"  # prefix of a window's extra tensors (quantization scales, zero points) in its parameter file
KL_CHUNK = 512  # positions per chunk of the head under --kl-weight
RESIDENT_SHARE = 0.4  # of the memory free when a window begins: its activation files held there, read once


class ResidentRows:
    """An activation file ``[samples, seqlen, hidden]`` held on the device in its stored dtype, so a window reads it
    from disk once instead of once per step."""

    def __init__(self, rows: TensorRows, device):
        self.shape, self.dtype = rows.shape, rows.dtype
        self.data = rows.rows(0, len(rows)).to(device)

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.data[start:stop]

    def take(self, indices) -> torch.Tensor:
        return self.data[torch.as_tensor(list(indices), device=self.data.device)]


class _Batches:
    """(input, target) batches of a window, by sample indices."""

    def __init__(self, fn):
        self.batch = fn


@dataclass(frozen=True)
class WindowJob:
    """What a windowed stage does: which model its windows start from, where its files live, and what trains.

    ``prepare(scope, masks, window_index, storage_dtype)`` makes the window's parameters trainable and returns an object
    with ``params`` (``MaskedParams``) and ``finalize()``, which leaves plain weights behind and returns extra tensors to
    store beside them (quantization parameters) or None. The default trains as ``--peft`` says.
    """

    stage: str = "reconstruct"
    source: str = "pruned"
    stream: str = "recon"
    masks: bool = True  # prune's keep-masks hold (not when quantizing the dense model)
    prepare: Callable | None = None

    @property
    def output(self) -> str:
        return WINDOW_STAGES[self.stage]


RECONSTRUCT = WindowJob()


class WindowRunner:
    """Everything one window needs: shards, caches, the dense reference and the chained stream."""

    def __init__(self, work, cfg, windows: list[Window], device, compute, job: WindowJob = RECONSTRUCT):
        self.work, self.cfg, self.windows, self.device, self.compute = work, cfg, windows, device, compute
        self.job, self.stream = job, job.stream
        # the final norm and head join the blocks on the device only when the last window needs them (--kl-weight)
        self.sk = Skeleton.from_work(work, job.source, device, compute, rest_device=device if cfg.kl_weight > 0 else "cpu")
        calib = work.stage("calibrate")
        self.cache_dtype = parse_dtype(calib.signature["cache_dtype"])
        self.samples = calib.summary["samples"]
        self.storage_dtype = next(
            v.dtype for v in load_tensors(work.stage_block_path(job.source, 0)).values() if v.is_floating_point()
        )
        self.sparse_inputs = cfg.inputs == "sparse"
        self._dense: tuple[int, nn.Module] | None = None
        self._resident: dict = {}
        self._resident_budget = 0
        perm = torch.randperm(self.samples, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_val = int(round(self.samples * cfg.val_fraction))
        if cfg.val_fraction and (n_val < 1 or n_val >= self.samples):
            raise FreelunchError(
                f"--val-fraction {cfg.val_fraction} of {self.samples} samples leaves no validation or no training samples"
            )
        self.val_idx, self.train_idx = sorted(perm[:n_val]), sorted(perm[n_val:])

    @cached_property
    def layout(self) -> Halves:
        """How a block splits into attention and MLP halves (only submodule windows ask)."""
        return block_halves(self.sk.build_block(0), self.sk.config.model_type)

    # ---- state -------------------------------------------------------------------------------------
    def dense_block(self, i: int) -> nn.Module:
        if self._dense is None or self._dense[0] != i:
            self._dense = (i, self.sk.build_block(i, load_tensors(self.work.stage_block_path("dense", i))))
        return self._dense[1]

    def done(self, win: Window) -> bool:
        return window_done(self.work, win.index, self.job.stage)

    def params_path(self, win: Window):
        return self.work.window_params_path(win.index, self.job.stage)

    def source_state(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i`` of the model the windows start from."""
        return load_tensors(self.work.stage_block_path(self.job.source, i))

    def window_params(self, win: Window) -> dict[str, torch.Tensor]:
        return load_tensors(self.work.check_file(self.params_path(win)))

    def current_state(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``: the source shard, with the parameters of every finished window that touched it."""
        state = self.source_state(i)
        for w in self.windows:
            if i in w.blocks and self.done(w):
                apply_params(state, self.window_params(w), i)
        return state

    def call(self, i: int, x: torch.Tensor):
        return self.sk.block_call(i, x.shape[0], x.shape[1])

    # ---- activations (what window kinds read) --------------------------------------------------------
    def rows(self, stream: str, name: str) -> TensorRows | ResidentRows:
        """An activation file of the current window: held on the device (read once) while the window's files fit
        ``RESIDENT_SHARE`` of the memory free when the window began; read batch by batch from disk otherwise."""
        path = self.work.check_file(self.work.act_path(stream, name))
        if path in self._resident:
            return self._resident[path]
        rows = TensorRows(path)
        size = rows.nbytes
        if size <= self._resident_budget:
            self._resident_budget -= size
            self._resident[path] = ResidentRows(rows, self.device)
            return self._resident[path]
        return rows

    def _begin_window(self) -> None:
        self._resident = {}
        free_memory(torch.device(self.device))
        self._resident_budget = int(RESIDENT_SHARE * available_memory(torch.device(self.device)))

    def input_stream(self, b: int) -> str:
        """The stream a window starting at block ``b`` reads: the chained one, except at the embeddings."""
        return self.stream if self.sparse_inputs and b > 0 else "dense"

    def load(self, rows: TensorRows | ResidentRows, idx) -> torch.Tensor:
        """Rows ``idx`` as float32 on the device; the cast happens there, a streamed batch arrives by a pinned,
        non-blocking copy."""
        x = rows.take(idx)
        if x.device != self.device and self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device, torch.float32)

    def dense_mid(self, i: int, x_dense: torch.Tensor) -> torch.Tensor:
        """The dense residual stream between block ``i``'s halves, from its dense input."""
        block = self.dense_block(i)
        with torch.no_grad():
            return self.layout.attention(block, x_dense.to(self.compute), self.call(i, x_dense)).float()

    def dense_matrix_io(self, i: int, name: str, x_dense: torch.Tensor):
        """The dense matrix's input and output inside dense block ``i``."""
        block = self.dense_block(i)
        return capture_linear_io(block, name, lambda: run_block(block, x_dense.to(self.compute), self.call(i, x_dense)))

    def logit_loss(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``kl_weight`` · KL(dense ‖ reconstructed) of the next-token distributions, through the frozen final
        norm and head: aligns the last window with what perplexity measures.

        The head runs ``KL_CHUNK`` positions at a time, each chunk recomputed in backward, so the vocabulary-wide
        logits of a whole batch never exist at once.
        """
        ys, ts = y.reshape(1, -1, y.shape[-1]), t.reshape(1, -1, t.shape[-1])
        chunk = min(KL_CHUNK, y.shape[1])  # no longer than a sequence: within the model's positions
        total = sum(
            torch.utils.checkpoint.checkpoint(self._kl_sum, ys[:, s : s + chunk], ts[:, s : s + chunk], use_reentrant=False)
            for s in range(0, ys.shape[1], chunk)
        )
        return self.cfg.kl_weight * (total / ys.shape[1]).to(y.device)

    def _kl_sum(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Summed KL(dense ‖ reconstructed) over the positions of ``y``, ``t`` ``[1, positions, hidden]``."""
        with torch.no_grad():
            teacher = torch.log_softmax(self.sk.head(t).float(), dim=-1)
        student = torch.log_softmax(self.sk.head(y).float(), dim=-1)
        return torch.nn.functional.kl_div(student[0], teacher[0], log_target=True, reduction="sum")

    # ---- one window --------------------------------------------------------------------------------
    def run(self, win: Window, claims: Claims | None = None, attempt: int = 1) -> dict | None:
        """Train, then write the window's parameters and its record; None if another worker took it over."""
        t0 = time.time()
        work, cfg = self.work, self.cfg
        self._begin_window()
        if self.sparse_inputs:
            self.ensure_chained_input(win)
        rec = {"window": win.as_dict(), "status": "running", "started": t0, "worker": worker_id(), "attempt": attempt}
        record = work.window_record_path(win.index, self.job.stage)
        write_json_atomic(record, rec)
        self.forget_assembled(win)
        blocks = {}
        for i in win.blocks:
            state = win.start_state(self.source_state(i), lambda i=i: self.current_state(i), self)
            blocks[i] = self.sk.build_block(i, state, dtype=torch.float32)
        masks = {}
        for i in win.blocks if self.job.masks else ():
            for name, keep in load_tensors(work.check_file(work.mask_path(i)), device=self.device).items():
                masks[f"{i}/{name}"] = keep
        scope = win.trained_modules(blocks, self)
        masks = {k: v for k, v in masks.items() if any(in_prefix(k, p) for p in scope)}
        if self.job.prepare is not None:
            trainable = self.job.prepare(scope, masks, win.index, self.storage_dtype)
        else:
            trainable = prepare(scope, masks, cfg.peft_config(win.index))
        total, free = trainable.params.count()
        extra = (
            self.logit_loss if cfg.kl_weight > 0 and win.last == self.sk.num_blocks - 1 and win.ends_at_block_output() else None
        )
        kill_point("window.train")  # tests: FREELUNCH_KILL_AT=window.train:1:OOM runs out of memory here
        result = train_window(
            win.forward(blocks, self),
            trainable.params,
            _Batches(win.batches(blocks, self)),
            self.train_idx,
            self.val_idx,
            cfg.train_config(win.index),
            self.device,
            self.compute,
            extra_loss=extra,
        )
        if extra is not None:
            result["kl_weight"] = cfg.kl_weight
        extra = trainable.finalize() or {}
        params = {QPARAMS + k: v for k, v in extra.items()}
        for prefix, module in scope.items():
            for k, v in module.state_dict().items():
                params[qualify(prefix, k)] = v.detach().to(self.storage_dtype) if v.is_floating_point() else v.detach()
        del blocks, scope, trainable
        if claims is not None and not claims.still_mine(win.index, attempt):
            return None  # declared dead and taken over meanwhile: the new owner writes this window
        path = self.params_path(win)
        work.record_file(path, save_tensors_atomic(path, params))
        if self.sparse_inputs and (wider := self.write_chained_output(win, params)):
            result["chained_dtype"] = wider  # its output exceeded the cache dtype's range
        rec.update(result, status="done", seconds=time.time() - t0, trainable_params=total, trainable_nonzero=free)
        write_json_atomic(record, rec)
        if self.sparse_inputs and not cfg.keep_cache:
            for name in win.chained_release():
                work.forget_file(work.act_path(self.stream, name))
        self._resident = {}
        free_memory(torch.device(self.device))
        return rec

    def release_memory(self) -> None:
        """Drop what the last window held on the device (after it ran out of memory) and return it to the device."""
        self._resident, self._dense = {}, None
        gc.collect()
        free_memory(torch.device(self.device))

    # ---- the chained stream (--inputs sparse) -------------------------------------------------------------
    def write_chained_output(self, win: Window, params: dict[str, torch.Tensor]) -> str | None:
        """Run the finished window, as it is stored, on its chained input; store the output for the next window.
        Returns the dtype's name where the output exceeded the cache dtype's range and was stored in a wider one."""
        name = win.chained_output(self.sk.num_blocks)
        if name is None:
            return None
        blocks = {}
        for j in win.blocks:
            blocks[j] = self.sk.build_block(j, apply_params(self.current_state(j), params, j))
        stream, source, fn = win.replay(blocks, self)
        src = self.rows(stream, source)

        def producer(rows_slice):
            with torch.no_grad():
                return fn(src.rows(rows_slice.start, rows_slice.stop).to(self.device, self.compute))

        stored = write_activations(
            self.work,
            self.work.act_path(self.stream, name),
            producer,
            self.samples,
            src.shape[1],
            self.sk.config.hidden_size,
            self.cache_dtype,
            8,
            f"the output of reconstructed window {win.index} ({win.label()}, in {dtype_name(self.compute)})",
        )
        return None if stored == self.cache_dtype else dtype_name(stored)

    def ensure_chained_input(self, win: Window) -> None:
        """Recreate a deleted chained input by replaying the finished windows that produce it, as stored."""
        needed = win.chained_input()
        if needed is None or self.work.is_recorded(self.work.act_path(self.stream, needed)):
            return
        producer = next(w for w in reversed(self.windows[: win.index]) if w.chained_output(self.sk.num_blocks) == needed)
        self.ensure_chained_input(producer)
        self.write_chained_output(producer, self.window_params(producer))

    # ---- assembly ----------------------------------------------------------------------------------
    def assemble_block(self, i: int) -> None:
        """Write block ``i`` of the stage's model: the source shard with its windows' parameters (and, where windows
        stored extra tensors, the block's quantization parameters beside it). Every window touching it must be done;
        ``stages.reconstruct.assemble_blocks`` shares the blocks between workers."""
        state, extra = self.source_state(i), {}
        for w in self.windows:  # each window file read once per block it touches
            if i in w.blocks:
                params = self.window_params(w)
                apply_params(state, params, i)
                extra.update(window_extra(params, i))
        if extra:  # before the block: a recorded block means its scales are there too
            path = self.work.qparams_path(i)
            self.work.record_file(path, save_tensors_atomic(path, extra))
        path = self.work.block_path(self.job.output, i)
        self.work.record_file(path, save_tensors_atomic(path, state))

    def assembled(self, i: int) -> bool:
        """Whether block ``i`` of this run's model is written (a window that runs again forgets its blocks first)."""
        return self.work.is_recorded(self.work.block_path(self.job.output, i))

    def forget_assembled(self, window: Window) -> None:
        """Forget the written blocks a window touches, before it writes a new result (they would hold the old one)."""
        work = self.work
        stale = [work.block_path(self.job.output, i) for i in window.blocks]
        if self.job.output == "quantized":  # the scales written beside its blocks (never another stage's files)
            stale += [work.qparams_path(i) for i in window.blocks]
        work.forget([work.rel(p) for p in stale if work.is_recorded(p)])


def window_extra(params: dict[str, torch.Tensor], block: int) -> dict[str, torch.Tensor]:
    """The extra tensors (``QPARAMS`` keys) a window stored for block ``block``, by their name in the block."""
    out = {}
    for key, value in params.items():
        if key.startswith(QPARAMS):
            b, _, name = key[len(QPARAMS) :].partition("/")
            if int(b) == block:
                out[name] = value
    return out


def apply_params(state: dict[str, torch.Tensor], params: dict[str, torch.Tensor], block: int) -> dict[str, torch.Tensor]:
    """Block ``block``'s state with a window's parameters (keyed "block/name") in place of the source ones."""
    for key, value in params.items():
        if key.startswith(QPARAMS):
            continue
        b, _, name = key.partition("/")
        if int(b) == block:
            put_tensor(state, name, value)
    return state


def in_prefix(key: str, prefix: str) -> bool:
    """Whether a qualified name lies under a trained module's prefix ("3/" holds everything of block 3)."""
    return key.startswith(prefix) if prefix.endswith("/") else key == prefix or key.startswith(prefix + ".")

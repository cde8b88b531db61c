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
from freelunch_cli.core.kill_points import kill_point
from freelunch_cli.engine.claims import Claim, worker_id
from freelunch_cli.engine.records import window_done
from freelunch_cli.model.activations import write_activations
from freelunch_cli.model.arch import Halves, block_halves
from freelunch_cli.model.hooks import capture_linear_io
from freelunch_cli.model.moe import put_tensor
from freelunch_cli.model.skeleton import Skeleton, run_block
from freelunch_cli.reconstruction.memory import block_numbers, estimate, parse_memory, resident_budget
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
        """Rows at ``indices``: an int64 tensor on the device (no host round trip), or a list of ints (copied there)."""
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(list(indices), dtype=torch.long).to(self.data.device)
        return self.data.index_select(0, indices)


class Stager:
    """Host-to-device copies of a window's batches, made by the prefetching thread: on CUDA through pinned staging
    buffers allocated once per window and source (``SLOTS`` of them, reused in turn; grown only when a batch is
    larger than any before) and a copy stream of their own, so that a copy overlaps the training step and nothing
    waits on the host. A buffer is rewritten only once the copy out of it has finished (an event; the prefetching
    thread waits on it, the training step never does). On the CPU a batch is handed over as read."""

    SLOTS = 3

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._slots: dict[object, list] = {}  # key -> [[pinned buffer, event or None], ...]
        self._turn: dict[object, int] = {}
        self.allocations = 0  # pinned buffers allocated (tests: once per window and source)

    def put(self, key, host: torch.Tensor) -> tuple[torch.Tensor, object]:
        """(``host`` on the device, the event its copy records, or None on the CPU); ``key`` names the source whose
        buffers it goes through."""
        if not self.cuda:
            return host, None
        slots = self._slots.setdefault(key, [])
        turn = self._turn.get(key, 0)
        self._turn[key] = (turn + 1) % self.SLOTS
        if len(slots) < self.SLOTS:
            slots.append([None, torch.cuda.Event()])
        slot = slots[turn]
        slot[1].synchronize()  # the copy out of this buffer, SLOTS batches ago, is done (at once if never recorded)
        if slot[0] is None or slot[0].shape[0] < host.shape[0] or slot[0].shape[1:] != host.shape[1:]:
            slot[0] = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
            self.allocations += 1
        buf = slot[0][: host.shape[0]]
        buf.copy_(host)
        with torch.cuda.stream(self.stream):
            out = buf.to(self.device, non_blocking=True)
            slot[1].record(self.stream)
        return out, slot[1]

    def take(self, staged: tuple[torch.Tensor, object]) -> torch.Tensor:
        """A staged tensor, safe to use on the current stream (which waits for its copy on the device)."""
        tensor, event = staged
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            tensor.record_stream(current)  # its memory is not reused before the step that reads it is done
        return tensor


class _Batches:
    """(input, target) batches of a window, by sample indices: ``batch(idx)`` computes them (on the training thread),
    ``prefetch(idx)`` stages their activation rows ahead (on the prefetching thread: I/O and copies only)."""

    def __init__(self, fn, prefetch):
        self.batch, self.prefetch = fn, prefetch


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
            v.dtype for v in load_tensors(work.model_block_path(job.source, 0)).values() if v.is_floating_point()
        )
        self.sparse_inputs = cfg.inputs == "sparse"
        self._dense: tuple[int, nn.Module] | None = None
        self._resident: dict = {}
        self._resident_budget = 0
        self._sources: list[TensorRows | ResidentRows] = []  # the activation files the current window's batches read
        self._staged: dict[tuple, tuple] = {}  # (source, indices) -> staged rows or indices, from the prefetching thread
        self._stager = Stager(device)  # a new one (new buffers) per window
        perm = torch.randperm(self.samples, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_val = held_out(self.samples, cfg.val_fraction)
        self.val_idx, self.train_idx = sorted(perm[:n_val]), sorted(perm[n_val:])

    @cached_property
    def layout(self) -> Halves:
        """How a block splits into attention and MLP halves (only submodule windows ask)."""
        return block_halves(self.sk.build_block(0), self.sk.config.model_type)

    # ---- state -------------------------------------------------------------------------------------
    def dense_block(self, i: int) -> nn.Module:
        if self._dense is None or self._dense[0] != i:
            self._dense = (i, self.sk.build_block(i, load_tensors(self.work.model_block_path("dense", i))))
        return self._dense[1]

    def done(self, win: Window) -> bool:
        return window_done(self.work, win.index, self.job.stage)

    def params_path(self, win: Window):
        return self.work.window_params_path(win.index, self.job.stage)

    def source_state(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i`` of the model the windows start from."""
        return load_tensors(self.work.model_block_path(self.job.source, i))

    def window_params(self, win: Window) -> dict[str, torch.Tensor]:
        return load_tensors(self.work.check_file(self.params_path(win)))

    def current_state(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``: the source shard, with the parameters of every finished window that touched it; the assembled
        block, which holds them all, where their parameter files were evicted after assembly."""
        finished = [w for w in self.windows if i in w.blocks and self.done(w)]
        if any(self.work.is_evicted(self.params_path(w)) for w in finished):
            return load_tensors(self.work.model_block_path(self.job.output, i))
        state = self.source_state(i)
        for w in finished:
            apply_params(state, self.window_params(w), i)
        return state

    def call(self, i: int, x: torch.Tensor):
        return self.sk.block_call(i, x.shape[0], x.shape[1])

    # ---- activations (what window kinds read) --------------------------------------------------------
    def rows(self, stream: str, name: str) -> TensorRows | ResidentRows:
        """An activation file of the current window: held on the device (read once) while the window's files fit
        ``RESIDENT_SHARE`` of the memory free when the window began; read batch by batch from disk otherwise."""
        path = self.work.check_file(self.work.act_path(stream, name))
        rows = self._resident.get(path)
        if rows is None:
            rows = TensorRows(path)
            size = rows.nbytes
            if size <= self._resident_budget:
                self._resident_budget -= size
                rows = self._resident[path] = ResidentRows(rows, self.device)
        if all(r is not rows for r in self._sources):
            self._sources.append(rows)
        return rows

    def _begin_window(self, win: Window) -> None:
        self._resident, self._sources, self._staged = {}, [], {}
        self._stager = Stager(self.device)
        free_memory(torch.device(self.device))
        self._resident_budget = self.resident_budget(win, available_memory(torch.device(self.device)))

    def resident_budget(self, win: Window, free: int) -> int:
        """Bytes of activation files window ``win`` may hold on the device, ``free`` bytes being free there: at most
        ``RESIDENT_SHARE`` of them, and never what the window's training needs by the memory estimate (the estimate
        ``--window auto`` chose the window by), within ``--max-memory`` when it is given."""
        calib = self.work.stage("calibrate").summary
        nums = block_numbers(self.sk.config, self.sk.templates[win.first])
        act_bytes = torch.tensor([], dtype=self.compute).element_size()
        kind = win.kind if win.kind in ("matrix", "submodule") else "blocks"
        need = estimate(kind, len(win.blocks), nums, self.cfg.batch_size, calib["seqlen"], act_bytes)["total"]
        limit = parse_memory(self.cfg.max_memory, torch.device(self.device)) if self.cfg.max_memory else None
        return resident_budget(free, need, RESIDENT_SHARE, limit)

    def input_stream(self, b: int) -> str:
        """The stream a window starting at block ``b`` reads: the chained one, except at the embeddings."""
        return self.stream if self.sparse_inputs and b > 0 else "dense"

    def prefetch(self, idx) -> None:
        """Stage rows ``idx`` of every activation file the window's batches read (on the prefetching thread: I/O and
        host-to-device copies only): a streamed file's rows, read from disk; a resident file's row indices."""
        for src in list(self._sources):
            self._staged[(id(src), tuple(idx))] = self._stage(src, idx)

    def _stage(self, rows: TensorRows | ResidentRows, idx) -> tuple:
        if isinstance(rows, ResidentRows):
            return self._stager.put((id(rows), "indices"), torch.tensor(list(idx), dtype=torch.long))
        return self._stager.put((id(rows), "rows"), rows.take(idx))

    def load(self, rows: TensorRows | ResidentRows, idx) -> torch.Tensor:
        """Rows ``idx`` as float32 on the device, the cast done there: what ``prefetch`` staged for them, or staged
        now (a streamed batch arrives through a pinned buffer and a non-blocking copy)."""
        staged = self._staged.pop((id(rows), tuple(idx)), None)
        if staged is None:
            staged = self._stage(rows, idx)
        x = self._stager.take(staged)
        if isinstance(rows, ResidentRows):
            x = rows.take(x)
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
    def run(self, win: Window, claim: Claim | None = None) -> dict | None:
        """Train, then write the window's parameters and its record; None if another worker took it over.

        ``claim`` (this worker's claim on the window) hears of progress (every step: the heartbeat) and is asked before
        every shared write (the running record, forgetting assembled blocks, the parameter file, the chained output,
        the done record): once the window was taken over, nothing more is written and None is returned."""
        t0 = time.time()
        work, cfg = self.work, self.cfg
        attempt = claim.attempt if claim is not None else 1
        beat = claim.progress if claim is not None else None
        lost = (lambda: not claim.holds()) if claim is not None else lambda: False
        self._begin_window(win)
        if lost():
            return None
        if self.sparse_inputs:
            self.ensure_chained_input(win)
        rec = {"window": win.as_dict(), "status": "running", "started": t0, "worker": worker_id(), "attempt": attempt}
        record = work.window_record_path(win.index, self.job.stage)
        if lost():
            return None
        write_json_atomic(record, rec)
        if lost():
            return None
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
        if beat is not None:
            beat()  # the window's modules are built: progress
        extra = (
            self.logit_loss if cfg.kl_weight > 0 and win.last == self.sk.num_blocks - 1 and win.ends_at_block_output() else None
        )
        kill_point("window.train")  # tests: FREELUNCH_KILL_AT=window.train:1:OOM runs out of memory here
        self._sources = []  # what the batches read, registered by rows() as the window kind asks for them
        batches = _Batches(win.batches(blocks, self), self.prefetch)
        try:
            result = train_window(
                win.forward(blocks, self),
                trainable.params,
                batches,
                self.train_idx,
                self.val_idx,
                cfg.train_config(win.index),
                self.device,
                self.compute,
                extra_loss=extra,
                on_step=beat,
            )
        finally:
            self._staged, self._sources = {}, []
        if extra is not None:
            result["kl_weight"] = cfg.kl_weight
        extra = trainable.finalize() or {}
        params = {QPARAMS + k: v for k, v in extra.items()}
        for prefix, module in scope.items():
            for k, v in module.state_dict().items():
                params[qualify(prefix, k)] = v.detach().to(self.storage_dtype) if v.is_floating_point() else v.detach()
        del blocks, scope, trainable
        if lost():
            return None  # declared dead and taken over meanwhile: the new owner writes this window
        path = self.params_path(win)
        work.record_file(path, save_tensors_atomic(path, params))
        if self.sparse_inputs:
            if lost():
                return None
            if wider := self.write_chained_output(win, params):
                result["chained_dtype"] = wider  # its output exceeded the cache dtype's range
        rec.update(result, status="done", seconds=time.time() - t0, trainable_params=total, trainable_nonzero=free)
        if lost():
            return None
        write_json_atomic(record, rec)
        if self.sparse_inputs and not cfg.keep_cache:
            for name in win.chained_release():
                work.forget_file(work.act_path(self.stream, name))
        self._resident, self._stager = {}, Stager(self.device)
        free_memory(torch.device(self.device))
        return rec

    def release_memory(self) -> None:
        """Drop what the last window held on the device (after it ran out of memory) and return it to the device."""
        self._resident, self._dense, self._staged, self._stager = {}, None, {}, Stager(self.device)
        gc.collect()
        free_memory(torch.device(self.device))

    # ---- the chained stream (--inputs sparse) -------------------------------------------------------------
    def write_chained_output(self, win: Window, params: dict[str, torch.Tensor] | None) -> str | None:
        """Run the finished window, as it is stored, on its chained input; store the output for the next window
        (``params`` None: the window's parameter file was evicted, and its assembled blocks hold them).
        Returns the dtype's name where the output exceeded the cache dtype's range and was stored in a wider one."""
        name = win.chained_output(self.sk.num_blocks)
        if name is None:
            return None
        blocks = {}
        for j in win.blocks:
            state = self.current_state(j)
            blocks[j] = self.sk.build_block(j, state if params is None else apply_params(state, params, j))
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
        evicted = self.work.is_evicted(self.params_path(producer))
        self.write_chained_output(producer, None if evicted else self.window_params(producer))

    # ---- assembly ----------------------------------------------------------------------------------
    def assemble_block(self, i: int) -> None:
        """Write block ``i`` of the stage's model: the source shard with its windows' parameters (and, where windows
        stored extra tensors, the block's quantization parameters beside it). Every window touching it must be done;
        ``engine.windowed.assemble_blocks`` shares the blocks between workers."""
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


def held_out(samples: int, fraction: float) -> int:
    """How many of ``samples`` calibration samples a window holds out for ``--val-fraction`` ``fraction``: the nearest
    count, at least one and never all of them; none without a fraction or with a single sample (windows then guard on
    their training samples, and their records say ``guard: training``)."""
    if not fraction or samples < 2:
        return 0
    return min(max(1, round(samples * fraction)), samples - 1)


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

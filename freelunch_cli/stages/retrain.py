"""Global retraining, the baseline every claim is measured against: next-token training of the whole pruned (or
reconstructed) model with its masks kept, resumable by step. `--from dense` fine-tunes the dense model the same way
(no masks): the control that tells how much of retraining's gain is a fit to the calibration domain rather than
recovery from pruning. After a reconstruction the default is not the baseline but the pipeline measured best: sparse
(masked) LoRA adapters on the reconstructed model (``LR_BY_PEFT`` in ``configs.stage_configs``).

The whole model is trained at once (this is what local reconstruction avoids): its memory is the full model with
gradients and AdamW moments plus the activations of a batch through every block. One process holds all of it
(``WholeModel``); under ``torchrun`` the processes shard it with FSDP2 (``ShardedModel``, ``training.fsdp``), each
taking an equal share of every batch, with sharded checkpoints. A run that cannot fit is refused before anything is
built, with the estimate and the number of GPUs it needs (``training.memory``).
"""

from __future__ import annotations

import copy
import math
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace

import torch

from freelunch_cli.configs.stage_configs import RetrainConfig
from freelunch_cli.core.console import Reporter
from freelunch_cli.core.device import dtype_name, resolve
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.kill_points import kill_point
from freelunch_cli.engine.models import require_model
from freelunch_cli.model.arch import block_linears, find_arch
from freelunch_cli.model.assembly import materialize
from freelunch_cli.model.build import init_non_persistent_buffers, meta_model, prepare_config
from freelunch_cli.model.source import trusts_remote_code, work_config, work_tokenizer
from freelunch_cli.model.text import read_text, resolve_text, sample_sequences, text_fingerprint, tokenize
from freelunch_cli.reconstruction.memory import block_numbers, device_memory, parse_memory
from freelunch_cli.training import fsdp, next_token
from freelunch_cli.training.loop import MaskedOptimizer, MaskedParams, autocast_factory
from freelunch_cli.training.memory import describe, processes_needed, retrain_estimate
from freelunch_cli.training.peft import Trainable, adapter_init, linears_of, prepare
from freelunch_cli.workdir.directory import STAGE_OF, WorkDir
from freelunch_cli.workdir.files import atomic_open, load_tensors, save_tensors_atomic, tensor_names, write_json_atomic
from freelunch_cli.workdir.stage import StageRun, open_stage

LORA_KEYS = (".parametrizations.weight.original", ".parametrizations.weight.0.")


def _training_ids(work: WorkDir, cfg: RetrainConfig, warn) -> tuple[torch.Tensor, dict]:
    """Token ids ``[n, seqlen]`` to train on (the calibration sequences, or ``--data``) and their signature."""
    ids = load_tensors(work.check_file(work.tokens_path))["input_ids"]
    if cfg.data is None:
        return ids, {"data": "calibration windows"}  # as recorded since the first version: resumes compare it
    src = resolve_text(cfg.data)
    text = read_text(src, warn)
    tok = work_tokenizer(work)
    out = sample_sequences(tokenize(tok, text), cfg.samples or ids.shape[0], ids.shape[1], cfg.seed, cfg.allow_overlap)
    return out, {"data": src.spec, "data_sha": text_fingerprint(text)}


def _start_model(work: WorkDir, start: str) -> str:
    work.require_done("calibrate" if start == "dense" else "prune", "retrain")
    if start == "latest":
        rc = work.stage("reconstruct")
        return "reconstructed" if rc is not None and rc.status == "done" else "pruned"
    return require_model(work, start)


def retrain(work: WorkDir, cfg: RetrainConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False) -> dict:
    """Train the whole ``--from`` model on next-token loss with its masks kept; write the ``retrained`` model's block
    shards and its own embeddings/head shard; return the summary.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes train one model sharded with FSDP2; each must be given the
    same options. Raises FreelunchError for bad options, a run that does not fit the device (with the estimate), or
    a checkpoint written by another number of processes.
    """
    rep = rep or Reporter(quiet=True)
    cfg.validate()
    world = fsdp.torchrun_world()
    device, compute = resolve(cfg.device, cfg.dtype)
    cfg = replace(cfg, dtype=dtype_name(compute))  # recorded as run
    start = _start_model(work, cfg.start)
    work.check_model(start)  # every block there before the stage begins
    chosen = cfg.peft is None and start == "reconstructed"
    cfg = cfg.resolved(start)
    if world is not None:
        if cfg.batch_size % world.size:
            raise FreelunchError(
                f"--batch-size {cfg.batch_size} must be a multiple of the {world.size} torchrun processes (each takes an "
                f"equal share of every batch)"
            )
        if compute == torch.float16:
            raise FreelunchError(
                "sharded retraining computes in bfloat16 or float32; use --dtype bfloat16 (or float32 on GPUs without bfloat16)"
            )
    ids, data_sig = _training_ids(work, cfg, rep.warn)
    signature = cfg.signature(start, work.stage(STAGE_OF[start]).run_id, data_sig)
    check_memory(work, cfg, start, world, device, compute, rep)
    if world is None:
        return _train(work, cfg, start, ids, signature, None, device, compute, chosen, rep, resume, force)
    fsdp.init_group(world, device)
    try:
        quiet = rep if world.main else Reporter(quiet=True)  # one console: rank 0's
        return _train(work, cfg, start, ids, signature, world, device, compute, chosen, quiet, resume, force)
    finally:
        fsdp.close_group()


@contextmanager
def _open(work: WorkDir, signature: dict, rep: Reporter, resume: bool, force: bool, world):
    """The stage under its exclusive lock. Under torchrun rank 0 takes the lock and begins, resumes or refuses the
    stage (a second torchrun run on the same directory is refused as a second process would be); the other ranks
    follow its decision without a lock of their own."""
    if world is None:
        with open_stage(work, "retrain", signature, rep, resume=resume, force=force) as run:
            yield run
        return
    with ExitStack() as stack:
        error, state = None, None
        if world.main:
            try:
                run = stack.enter_context(open_stage(work, "retrain", signature, rep, resume=resume, force=force))
                state = run.state
            except FreelunchError as e:
                error = str(e)
        error, state = fsdp.broadcast((error, state))
        if error is not None:
            raise FreelunchError(error)
        if not world.main:
            run = StageRun(work, "retrain", state)
            if run.done:
                run.summary = work.stage("retrain").summary
        yield run


def _train(work, cfg, start, ids, signature, world, device, compute, chosen, rep, resume, force) -> dict:
    with _open(work, signature, rep, resume, force, world) as run:
        if run.done:
            return run.summary
        model = WholeModel(work, cfg, start, device) if world is None else ShardedModel(work, cfg, start, world, device, compute)
        n_train = sum(p.numel() for p in model.params.params)
        n = ids.shape[0]
        per_epoch = math.ceil(n / cfg.batch_size)
        total = cfg.steps or per_epoch * cfg.epochs
        opt = MaskedOptimizer(
            model.params, cfg.lr, cfg.weight_decay, int(total * cfg.warmup), total, device, compute, cfg.grad_clip, "retraining"
        )
        if world is not None:
            opt.agree = fsdp.all_finite
        step, losses, before = model.resume(opt)
        if step:
            rep.info(f"retrain: resuming at step {step} of {total}")
        where = "" if world is None else f" sharded over {world.size} processes (FSDP2),"
        rep.info(
            f"retrain: the whole {start} model ({cfg.peft}, {n_train:,} trainable parameters),{where} {total} steps of "
            f"{min(cfg.batch_size, n)} x {ids.shape[1]} tokens, lr {cfg.lr}"
            + (" (the default after a reconstruction; --peft full trains every weight)" if chosen else "")
        )
        autocast = autocast_factory(device, compute) if world is None else nullcontext  # sharded: FSDP's policy casts
        pending = []  # this run's losses, on the device until a checkpoint or the end needs them
        with rep.progress("retrain", total=total, completed=step) as bar:
            while step < total:
                epoch, offset = divmod(step, per_epoch)
                order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
                batch = ids[order[offset * cfg.batch_size : (offset + 1) * cfg.batch_size]]
                with autocast():
                    loss = model.loss(model.share(batch).to(device))
                opt.step(loss)
                step += 1
                pending.append(loss.detach())
                bar.advance()
                kill_point("retrain.step")
                if step % cfg.save_every == 0 and step < total:
                    opt.check()
                    losses += model.mean_losses(pending)
                    pending = []
                    model.save_checkpoint(opt, {"step": step, "losses": losses, "seconds": before + run.seconds()})
        opt.finish()
        losses += model.mean_losses(pending) if pending else []
        model.save(before + run.seconds())
        summary = {
            "work": str(work.root),
            "from": start,
            "steps": total,
            "tokens": trained_rows(total, n, cfg.batch_size) * ids.shape[1],
            "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else None,
            "trainable_params": n_train,
            "seconds": round(before + run.seconds(), 2),
            "dtype": dtype_name(compute),
            "processes": 1 if world is None else world.size,
        }
        line = f"retrained the {start} model for {total} steps ({summary['tokens']} tokens) in {summary['seconds']:.1f}s"
        if world is not None and not world.main:
            return run.report(line, summary)  # rank 0 marks the stage done
        summary = run.finish(summary, line, config=cfg)
        model.discard_checkpoints()  # only once the stage is done: a kill before resumes from the last one
        return summary


def trained_rows(steps: int, n: int, batch_size: int) -> int:
    """The sequences ``steps`` steps train on: each epoch draws its ``n`` sequences in batches of ``batch_size``, the
    last batch of an epoch holding the ``n mod batch_size`` left over (a batch larger than ``n`` holds all ``n``)."""
    per_epoch = math.ceil(n / batch_size)
    return sum(min(batch_size, n - (s % per_epoch) * batch_size) for s in range(steps))


def _refuse_other_world(work: WorkDir, world) -> None:
    """Refuse to resume a checkpoint written by another number of processes (sharded checkpoints are laid out for
    theirs; a single process's ``checkpoint.pt`` holds the whole model)."""
    size = 1 if world is None else world.size
    pointer = fsdp.read_pointer(work.retrain_sharded_checkpoint_dir)
    if pointer is not None and pointer["world_size"] != size:
        raise FreelunchError(fsdp.world_size_mismatch(pointer["step"], pointer["world_size"], size))
    if size > 1 and work.retrain_checkpoint_path.exists():
        raise FreelunchError(fsdp.world_size_mismatch(None, 1, size))


def _storage_dtype(work: WorkDir, start: str) -> torch.dtype:
    return next(v.dtype for v in load_tensors(work.model_block_path(start, 0)).values() if v.is_floating_point())


def _block_masks(work: WorkDir, start: str, i: int, device="cpu") -> dict[str, torch.Tensor]:
    """Block ``i``'s keep-masks by qualified name ("3/mlp.up_proj"); none for the dense control."""
    if start == "dense":
        return {}
    return {f"{i}/{name}": keep for name, keep in load_tensors(work.check_file(work.mask_path(i)), device=device).items()}


def _meta_masks(work: WorkDir, start: str, layers) -> dict[str, torch.Tensor]:
    """The keep-masks the model has, by qualified name, as meta tensors (shapes only; read from the mask files' headers):
    only the matrices prune pruned (``--skip``, ``--skip-blocks`` and gates stay dense and unmasked); none for dense."""
    if start == "dense":
        return {}
    out = {}
    for i, block in enumerate(layers):
        linears = block_linears(block)
        for name in tensor_names(work.check_file(work.mask_path(i))):
            out[f"{i}/{name}"] = torch.empty(linears[name].weight.shape, dtype=torch.bool, device="meta")
    return out


class WholeModel:
    """The whole model in one process, in float32 on the device; checkpoints with ``torch.save``."""

    def __init__(self, work: WorkDir, cfg: RetrainConfig, start: str, device):
        self.work, self.cfg, self.start, self.device = work, cfg, start, device
        _refuse_other_world(work, None)
        self.model = materialize(work, start, device, torch.float32)
        self.arch = find_arch(self.model, self.model.config)
        self.layers = self.model.get_submodule(self.arch.layers_path)
        self.masks = {}  # by qualified name "i/mlp.up_proj"; none for the dense control: every weight trains
        for i in range(len(self.layers)):
            self.masks.update(_block_masks(work, start, i, device))
        if cfg.grad_checkpoint:
            next_token.recompute_in_backward(self.layers)
        self.trainable = next_token.choose_trainable(self.model, self.layers, self.masks, cfg.peft_config())
        self.params = self.trainable.params
        self.head_chunk = next_token.HEAD_CHUNK if cfg.grad_checkpoint else None
        self.model.train(False)  # no dropout: the same deterministic forward as every other stage

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return next_token.next_token_loss(self.model, batch, self.head_chunk)

    def mean_losses(self, pending: list) -> list[float]:
        return torch.stack(pending).tolist()

    def resume(self, opt: MaskedOptimizer) -> tuple[int, list, float]:
        """(step, losses, seconds of earlier runs) of the checkpoint, loaded; zeros without one."""
        path = self.work.retrain_checkpoint_path
        if not path.exists():
            return 0, [], 0.0
        ck = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(ck["model"])
        opt.load_state_dict(ck, ck["step"])
        return ck["step"], ck["losses"], ck.get("seconds", 0.0)

    def save_checkpoint(self, opt: MaskedOptimizer, meta: dict) -> None:
        with atomic_open(self.work.retrain_checkpoint_path) as f:  # streamed to disk: no in-memory copy
            torch.save({"model": self.model.state_dict(), **opt.state_dict(), **meta}, f)

    def save(self, seconds: float) -> None:
        """The retrained model as block shards plus its own embeddings/head shard, in the storage dtype."""
        work = self.work
        self.trainable.finalize()  # LoRA merged, masks re-applied: plain weights as sparse as the pruned model's
        storage = _storage_dtype(work, self.start)
        for i, block in enumerate(self.layers):
            state = {k: v.detach().to(storage) for k, v in block.state_dict().items()}
            path = work.block_path("retrained", i)
            work.record_file(path, save_tensors_atomic(path, state))
        _save_rest(work, self.model, self.arch, storage, {k: v.detach() for k, v in self.model.state_dict().items()})

    def discard_checkpoints(self) -> None:
        self.work.retrain_checkpoint_path.unlink(missing_ok=True)


class ShardedModel:
    """The model sharded over the torchrun processes with FSDP2: built on the meta device, filled one block at a time,
    each process training on its share (``rank::world``) of every batch; sharded checkpoints; gathered one block at
    a time at the end, each block written by process ``block % world``."""

    def __init__(self, work: WorkDir, cfg: RetrainConfig, start: str, world, device, compute):
        self.work, self.cfg, self.start, self.world, self.device = work, cfg, start, world, device
        _refuse_other_world(work, world)
        trusted = trusts_remote_code(work)
        config = prepare_config(work_config(work))
        self.lm = meta_model(config, trusted)
        self.arch = find_arch(self.lm, config)
        self.layers = self.lm.get_submodule(self.arch.layers_path)
        self.templates = list(meta_model(config, trusted).get_submodule(self.arch.layers_path))  # plain blocks for saving
        if getattr(config, "tie_word_embeddings", False):
            self.lm.tie_weights()
        peft = cfg.peft_config()
        meta_masks = _meta_masks(work, start, self.layers)  # shapes only: masked-LoRA's are filled block by block below
        self.trainable = next_token.choose_trainable(self.lm, self.layers, meta_masks, peft)
        fsdp.shard_masks_of_adapters(self.lm)
        if cfg.grad_checkpoint:
            next_token.recompute_in_backward(self.layers)
        self.step_module = next_token.NextTokenLoss(self.lm, next_token.HEAD_CHUNK if cfg.grad_checkpoint else None)
        fsdp.shard(self.step_module, self.layers, compute)
        self.step_module.to_empty(device=device)
        init_non_persistent_buffers(self.lm)
        self._fill(peft)
        self.step_module.train(False)

    def _fill(self, peft) -> None:
        """Every parameter's shard from the work directory's files (block by block), adapters from their seed, and the
        keep-masks of full retraining sharded like their weights."""
        work, start, prefix = self.work, self.start, self.arch.layers_path + "."
        rest = load_tensors(work.rest_path(start))
        tied = getattr(self.lm.config, "tie_word_embeddings", False)
        rest = {f"lm.{k}": v for k, v in rest.items() if not (tied and k.endswith("lm_head.weight"))}
        fsdp.load_full(self.step_module, rest)
        loaded = set(rest)
        lora = peft.variant in ("lora", "masked-lora")
        starts = adapter_init(linears_of({f"{i}/": b for i, b in enumerate(self.layers)}), peft) if lora else {}
        by_id = {}
        for i, block in enumerate(self.layers):
            plain = load_tensors(work.model_block_path(start, i))
            masks = _block_masks(work, start, i)
            state = {}
            for key, value in block.state_dict().items():
                state[key] = self._value(i, key, value, plain, masks, starts)
            state = {f"lm.{prefix}{i}.{k}": v for k, v in state.items()}
            fsdp.load_full(self.step_module, state)
            loaded.update(state)
            if peft.variant == "full":
                for name, lin in block_linears(block).items():
                    if f"{i}/{name}" in masks:
                        by_id[id(lin.weight)] = fsdp.distribute_like(lin.weight, masks[f"{i}/{name}"])
        unfilled = [k for k in self.step_module.state_dict() if k not in loaded and not (tied and k.endswith("lm_head.weight"))]
        if unfilled:  # after to_empty() they hold whatever memory held
            raise FreelunchError(f"could not assemble the model: no values for {unfilled[:4]} in {work.root}")
        params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.params = MaskedParams(params, by_id)

    @staticmethod
    def _value(i: int, key: str, like, plain: dict, masks: dict, starts: dict) -> torch.Tensor:
        """The full starting value of a block's state entry ``key``: a stored weight, or an adapter's A, B or mask."""
        if key.endswith(LORA_KEYS[0]):
            return plain[key[: -len(LORA_KEYS[0])] + ".weight"]
        if LORA_KEYS[1] in key:
            linear, _, part = key.partition(LORA_KEYS[1])
            if part == "A":
                return starts[f"{i}/{linear}"]
            if part == "B":
                return torch.zeros(like.shape, dtype=torch.float32)
            return masks[f"{i}/{linear}"]
        return plain[key]

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of ``batch`` (``rank::world``). A short last batch leaves some processes fewer rows, or
        none: their loss is weighted by their share (``rows x world / batch rows``, 1 for an even split), so the
        averaged gradient is that of the batch's mean loss, as one process computes it; a process with no row runs
        the first row at weight 0, so that every process takes part in every collective."""
        rows = batch[self.world.rank :: self.world.size]
        self.weight = len(rows) * self.world.size / len(batch)
        return rows if len(rows) else batch[:1]

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        loss = self.step_module(batch)
        return loss if self.weight == 1.0 else loss * self.weight

    def mean_losses(self, pending: list) -> list[float]:
        return fsdp.mean_over_ranks(torch.stack(pending)).tolist()

    def resume(self, opt: MaskedOptimizer) -> tuple[int, list, float]:
        folder = self.work.retrain_sharded_checkpoint_dir
        meta = fsdp.read_pointer(folder)  # of this world size: _refuse_other_world checked it before the model was built
        if meta is None:
            return 0, [], 0.0
        fsdp.load_checkpoint(folder / meta["folder"], self.step_module, opt.opt)
        opt.sched.load_state_dict(meta["scheduler"])
        opt.steps = opt._checked = meta["step"]
        return meta["step"], meta["losses"], meta.get("seconds", 0.0)

    def save_checkpoint(self, opt: MaskedOptimizer, meta: dict) -> None:
        folder = self.work.retrain_sharded_checkpoint_dir
        folder.mkdir(parents=True, exist_ok=True)
        fsdp.save_checkpoint(
            folder, self.step_module, opt.opt, {**meta, "scheduler": opt.sched.state_dict()}, self.world, write_json_atomic
        )

    def save(self, seconds: float) -> None:
        """Gather each block whole (every process, one block at a time), merge adapters and re-apply masks on a plain
        copy, and write it from process ``block % world``; rank 0 writes the embeddings and head."""
        work, world, peft = self.work, self.world, self.cfg.peft_config()
        storage = _storage_dtype(work, self.start)
        for i, block in enumerate(self.layers):
            full = fsdp.gather_full(block)
            if i % world.size != world.rank:
                continue
            replica = copy.deepcopy(self.templates[i])
            masks = _block_masks(work, self.start, i)
            scope = {f"{i}/": replica}
            trainable = prepare(scope, masks, peft) if peft.variant in ("lora", "masked-lora") else None
            replica.to_empty(device="cpu")
            replica.load_state_dict(full, strict=True)
            Trainable(MaskedParams([], {}), linears_of(scope), masks, lora=trainable is not None).finalize()
            state = {k: v.detach().to(storage) for k, v in replica.state_dict().items()}
            path = work.block_path("retrained", i)
            work.record_file(path, save_tensors_atomic(path, state))
        prefix = "lm." + self.arch.layers_path + "."
        rest = fsdp.gather_full(self.step_module, keep=lambda k: not k.startswith(prefix))
        if world.main:
            _save_rest(work, self.lm, self.arch, storage, {k.removeprefix("lm."): v for k, v in rest.items()})
        fsdp.barrier()  # every block written before rank 0 marks the stage done

    def discard_checkpoints(self) -> None:
        fsdp.remove_checkpoints(self.work.retrain_sharded_checkpoint_dir)


def _save_rest(work: WorkDir, model, arch, storage: torch.dtype, state: dict) -> None:
    """The retrained embeddings, final norm and head (the tied head left out, as in every checkpoint)."""
    prefix = arch.layers_path + "."
    tied = getattr(model.config, "tie_word_embeddings", False)
    rest = {
        k: v.to(storage) for k, v in state.items() if not k.startswith(prefix) and not (tied and k.endswith("lm_head.weight"))
    }
    path = work.own_rest_path("retrained")
    work.record_file(path, save_tensors_atomic(path, rest))


def check_memory(work: WorkDir, cfg: RetrainConfig, start: str, world, device, compute, rep: Reporter) -> dict | None:
    """Estimate the memory per process (``training.memory``) and refuse, before building anything, a run that does not
    fit the device (``--max-memory``, else a GPU's memory; on the CPU only with ``--max-memory``). Returns the
    estimate, or None when nothing was checked."""
    device = torch.device(device)
    if cfg.max_memory is None and device.type != "cuda":
        return None
    budget = parse_memory(cfg.max_memory, device) if cfg.max_memory else device_memory(device)
    config = prepare_config(work_config(work))
    lm = meta_model(config, trusts_remote_code(work))
    arch = find_arch(lm, config)
    layers = lm.get_submodule(arch.layers_path)
    nums = block_numbers(config, layers[0])
    masked = _meta_masks(work, start, layers)
    peft = cfg.peft_config()
    trainable = next_token.choose_trainable(lm, layers, masked, peft)
    n_train = sum(p.numel() for p in trainable.params.params)
    n_masked = 0 if peft.variant in ("lora", "bias-norm") else sum(m.numel() for m in masked.values())
    prefix = arch.layers_path + "."
    rest_params = sum(p.numel() for n, p in lm.named_parameters() if not n.startswith(prefix))
    seqlen = work.stage("calibrate").summary["seqlen"]  # --data is cut to the calibration's length too
    compute_bytes = torch.tensor([], dtype=compute).element_size()

    def estimate_for(size: int) -> dict:
        return retrain_estimate(
            nums,
            len(layers),
            rest_params,
            config.vocab_size,
            n_train,
            n_masked,
            cfg.batch_size,
            seqlen,
            size,
            compute_bytes,
            bool(cfg.grad_checkpoint),
            next_token.HEAD_CHUNK,
            trains_rest=peft.variant == "full",
            masks_gathered=peft.variant == "masked-lora",
        )

    size = 1 if world is None else world.size
    est = estimate_for(size)
    rep.info(f"retrain memory estimate: {describe(est, size)}; budget {budget / 2**30:.1f} GiB")
    if est["total"] <= budget:
        return est
    needed = processes_needed(estimate_for, budget)
    launch = f"--nproc-per-node {needed}" if needed and needed <= 8 else f"--nnodes {(needed or 8) // 8} --nproc-per-node 8"
    fits = (
        f"it fits on {needed} GPUs of this size (torchrun {launch}, --batch-size a multiple of {needed})"
        if needed
        else "no number of GPUs of this size fits it"
    )
    lighter = "; or train sparse adapters: --peft masked-lora" if peft.variant == "full" else ""
    raise FreelunchError(
        f"retraining the {start} model ({peft.variant}) needs about {describe(est, size)}, more than the "
        f"{budget / 2**30:.1f} GiB {'of --max-memory' if cfg.max_memory else f'of {device}'}; {fits}{lighter}"
    )

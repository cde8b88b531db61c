"""Global retraining, the baseline every claim is measured against: next-token training of the whole
pruned (or reconstructed) model with its masks kept, resumable by step. `--from dense` fine-tunes the dense
model the same way (no masks): the control that tells how much of retraining's gain is a fit to the
calibration domain rather than recovery from pruning. After a reconstruction the default is not the baseline
but the pipeline measured best: sparse (masked) LoRA adapters on the reconstructed model (``LR_BY_PEFT`` in
``stages.options``).

The whole model is trained at once (this is what local reconstruction avoids): its memory is the full model
with gradients and AdamW moments plus the activations of a batch through every block.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from freelunch_cli.core.console import Reporter
from freelunch_cli.core.device import dtype_name, resolve
from freelunch_cli.core.kill_points import kill_point
from freelunch_cli.model.arch import block_linears, find_arch
from freelunch_cli.model.assembly import materialize
from freelunch_cli.model.source import work_tokenizer
from freelunch_cli.model.text import read_text, resolve_text, sample_sequences, text_fingerprint, tokenize
from freelunch_cli.stages.models import require_model
from freelunch_cli.stages.options import RetrainConfig
from freelunch_cli.training import next_token
from freelunch_cli.training.loop import MaskedOptimizer, autocast_factory
from freelunch_cli.workdir.directory import STAGE_OF, WorkDir
from freelunch_cli.workdir.files import atomic_open, load_tensors, save_tensors_atomic
from freelunch_cli.workdir.stage import open_stage


def _training_ids(work: WorkDir, cfg: RetrainConfig) -> tuple[torch.Tensor, dict]:
    """Token ids ``[n, seqlen]`` to train on (the calibration sequences, or ``--data``) and their signature."""
    ids = load_tensors(work.check_file(work.tokens_path))["input_ids"]
    if cfg.data is None:
        return ids, {"data": "calibration windows"}  # as recorded since the first version: resumes compare it
    src = resolve_text(cfg.data)
    text = read_text(src)
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
    shards and its own embeddings/head shard; return the summary."""
    rep = rep or Reporter(quiet=True)
    cfg.validate()
    device, compute = resolve(cfg.device, cfg.dtype)
    cfg = replace(cfg, dtype=dtype_name(compute))  # recorded as run
    start = _start_model(work, cfg.start)
    chosen = cfg.peft is None and start == "reconstructed"
    cfg = cfg.resolved(start)
    ids, data_sig = _training_ids(work, cfg)
    signature = cfg.signature(start, work.stage(STAGE_OF[start]).run_id, data_sig)
    with open_stage(work, "retrain", signature, rep, resume=resume, force=force) as run:
        if run.done:
            return run.summary
        model = materialize(work, start, device, torch.float32)
        arch = find_arch(model, model.config)
        layers = model.get_submodule(arch.layers_path)
        masks = {}  # by qualified name "i/mlp.up_proj"; none for the dense control: every weight trains
        for i in range(len(layers) if start != "dense" else 0):
            masks.update(
                {f"{i}/{name}": keep for name, keep in load_tensors(work.check_file(work.mask_path(i)), device=device).items()}
            )
        if cfg.grad_checkpoint:
            next_token.recompute_in_backward(layers)
        trainable = next_token.choose_trainable(model, layers, masks, cfg.peft_config())
        params = trainable.params
        n_train = sum(p.numel() for p in params.params)
        n = ids.shape[0]
        per_epoch = math.ceil(n / cfg.batch_size)
        total = cfg.steps or per_epoch * cfg.epochs
        opt = MaskedOptimizer(
            params, cfg.lr, cfg.weight_decay, int(total * cfg.warmup), total, device, compute, cfg.grad_clip, "retraining"
        )
        ckpt_path = work.retrain_checkpoint_path
        step, losses, before = 0, [], 0.0  # before: training seconds of earlier runs, so a resumed run reports the total
        if ckpt_path.exists():
            ck = torch.load(ckpt_path, map_location=device, weights_only=False)
            model.load_state_dict(ck["model"])
            step, losses, before = ck["step"], ck["losses"], ck.get("seconds", 0.0)
            opt.load_state_dict(ck, step)
            rep.info(f"retrain: resuming at step {step} of {total}")
        rep.info(
            f"retrain: the whole {start} model ({cfg.peft}, {n_train:,} trainable parameters), {total} steps of "
            f"{cfg.batch_size} x {ids.shape[1]} tokens, lr {cfg.lr}"
            + (" (the default after a reconstruction; --peft full trains every weight)" if chosen else "")
        )
        autocast = autocast_factory(device, compute)
        head_chunk = next_token.HEAD_CHUNK if cfg.grad_checkpoint else None
        model.train(False)  # no dropout: the same deterministic forward as every other stage
        pending = []  # this run's losses, on the device until a checkpoint or the end needs them
        with rep.progress("retrain", total=total, completed=step) as bar:
            while step < total:
                epoch, offset = divmod(step, per_epoch)
                order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
                batch = ids[order[offset * cfg.batch_size : (offset + 1) * cfg.batch_size]].to(device)
                with autocast():
                    loss = next_token.next_token_loss(model, batch, head_chunk)
                opt.step(loss)
                step += 1
                pending.append(loss.detach())
                bar.advance()
                kill_point("retrain.step")
                if step % cfg.save_every == 0 and step < total:
                    opt.check()
                    losses += torch.stack(pending).tolist()
                    pending = []
                    with atomic_open(ckpt_path) as f:  # streamed to disk: no in-memory copy of model + optimizer
                        torch.save(
                            {
                                "model": model.state_dict(),
                                **opt.state_dict(),
                                "step": step,
                                "losses": losses,
                                "seconds": before + run.seconds(),
                            },
                            f,
                        )
        opt.finish()
        losses += torch.stack(pending).tolist() if pending else []
        trainable.finalize()  # LoRA merged, masks re-applied: plain weights as sparse as the pruned model's
        _save(work, model, arch, layers, start, {id(trainable.linears[q].weight): keep for q, keep in masks.items()})
        ckpt_path.unlink(missing_ok=True)
        summary = {
            "work": str(work.root),
            "from": start,
            "steps": total,
            "tokens": total * cfg.batch_size * ids.shape[1],
            "first_loss": losses[0] if losses else None,
            "last_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else None,
            "trainable_params": n_train,
            "seconds": round(before + run.seconds(), 2),
            "dtype": dtype_name(compute),
        }
        line = f"retrained the {start} model for {total} steps ({summary['tokens']} tokens) in {summary['seconds']:.1f}s"
        return run.finish(summary, line, config=cfg)


def _save(work: WorkDir, model, arch, layers, start: str, masks: dict) -> None:
    """The retrained model as block shards plus its own embeddings/head shard, in the storage dtype.

    ``masks`` maps a weight's id to its keep mask (as trained with); a pruned weight that is not zero is a bug.
    """
    storage = next(v.dtype for v in load_tensors(work.stage_block_path(start, 0)).values() if v.is_floating_point())
    for i, block in enumerate(layers):
        for name, lin in block_linears(block).items():
            keep = masks.get(id(lin.weight))
            if keep is not None and bool((lin.weight.detach()[~keep] != 0).any()):
                raise RuntimeError(f"block {i} {name}: a pruned weight became nonzero during retraining")
        state = {k: v.detach().to(storage) for k, v in block.state_dict().items()}
        path = work.block_path("retrained", i)
        work.record_file(path, save_tensors_atomic(path, state))
    prefix = arch.layers_path + "."
    tied = getattr(model.config, "tie_word_embeddings", False)
    rest = {
        k: v.detach().to(storage)
        for k, v in model.state_dict().items()
        if not k.startswith(prefix) and not (tied and k.endswith("lm_head.weight"))
    }
    path = work.own_rest_path("retrained")
    work.record_file(path, save_tensors_atomic(path, rest))

"""Global retraining, the baseline every claim is measured against: next-token training of the whole
pruned (or reconstructed) model with its masks kept, resumable by step. `--from dense` fine-tunes the dense
model the same way (no masks): the control that tells how much of retraining's gain is a fit to the
calibration domain rather than recovery from pruning. After a reconstruction the default is not the baseline
but the pipeline measured best: sparse (masked) LoRA adapters on the reconstructed model (see LR_BY_PEFT).

The whole model is trained at once (this is what local reconstruction avoids): its memory is the full model
with gradients and AdamW moments plus the activations of a batch through every block.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.utils.checkpoint
import torch.nn.functional as F

from freelunch_cli.arch import block_linears, find_arch
from freelunch_cli.console import Reporter
from freelunch_cli.data import read_text, resolve_text, sample_windows, text_fingerprint, tokenize
from freelunch_cli.errors import FreelunchError
from freelunch_cli.faults import checkpoint
from freelunch_cli.head_loss import linear_cross_entropy
from freelunch_cli.peft import PeftConfig, Trainable, prepare
from freelunch_cli.runtime import dtype_name, parse_dtype, pick_device
from freelunch_cli.storage import atomic_open, load_tensors, save_tensors_atomic
from freelunch_cli.train import MaskedParams, autocast_factory, linear_schedule, masked_step
from freelunch_cli.workdir import STAGE_OF, WorkDir, stage_lock
from freelunch_cli.zeroshot import materialize


# Defaults that follow what trains (bench/RESULTS.md, sweep groups "peft" and "gap"): after a reconstruction,
# sparse adapters at 1e-3 with recomputation were the best pipeline measured (26.76 / 65.54 over 3 seeds against
# 27.41 / 64.45 for full retraining, at under half its memory); from the pruned model full retraining stays
# the baseline. Adapters want 10x full training's rate (masked-LoRA from pruned: 30.71 at 1e-3, 44.23 at 1e-4);
# biases and norms at 1e-2 fit WikiText and lose Shakespeare, so they take 1e-3 as well.
PEFT_AFTER_RECONSTRUCTION = "masked-lora"
LR_BY_PEFT = {"full": 1e-4, "bias-norm": 1e-3, "lora": 1e-3, "masked-lora": 1e-3}


@dataclass
class RetrainConfig:
    start: str = "latest"  # the model to retrain: pruned, reconstructed, the latest of the two, or dense (a control)
    lr: float | None = None  # None: LR_BY_PEFT of what trains
    epochs: int = 1
    steps: int | None = None  # overrides epochs
    batch_size: int = 4
    warmup: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    data: str | None = None  # other training text (default: the calibration windows)
    samples: int | None = None  # windows of --data (default: as many as calibrated)
    allow_overlap: bool = False
    save_every: int = 50  # steps between resumable checkpoints
    device: str = "auto"
    dtype: str = "float32"
    grad_checkpoint: bool | None = None  # recompute block activations in backward (None: on for PEFT, whose memory is activations)
    peft: str | None = None  # full, bias-norm, lora or masked-lora (None: masked-lora after a reconstruction, else full)
    lora_rank: int = 16
    lora_alpha: float = 32.0

    def validate(self) -> None:
        if (self.lr is not None and self.lr <= 0) or self.epochs < 1 or self.batch_size < 1 or (self.steps is not None and self.steps < 1) or self.save_every < 1:
            raise FreelunchError("--lr must be positive; --epochs, --steps, --batch-size and --save-every at least 1")
        if not 0 <= self.warmup < 1:
            raise FreelunchError("--warmup is a fraction of the steps, in [0, 1)")
        if self.start not in ("latest", "pruned", "reconstructed", "dense"):
            raise FreelunchError("--from must be latest, pruned, reconstructed or dense")
        if self.peft is not None:
            self.peft_config().validate()

    def resolved(self, start: str) -> RetrainConfig:
        """The options as run from ``start`` (pruned, reconstructed or dense): unset ones take the defaults above."""
        peft = self.peft or (PEFT_AFTER_RECONSTRUCTION if start == "reconstructed" else "full")
        return replace(self, peft=peft, lr=LR_BY_PEFT[peft] if self.lr is None else self.lr,
                       grad_checkpoint=peft != "full" if self.grad_checkpoint is None else self.grad_checkpoint)

    def peft_config(self) -> PeftConfig:
        return PeftConfig(self.peft, self.lora_rank, self.lora_alpha, self.seed)

    def signature(self) -> dict:
        """What the run computes. Device, checkpoint spacing and recomputation are how, not what: a run may resume
        with other values. The LoRA shape matters only to LoRA, and full training is left implicit, so a run
        started before --peft existed still resumes."""
        sig = asdict(self)
        for k in ("device", "save_every", "start", "grad_checkpoint"):
            sig.pop(k)
        if self.peft == "full":
            sig.pop("peft")
        if self.peft not in ("lora", "masked-lora"):
            sig.pop("lora_rank"), sig.pop("lora_alpha")
        return sig


def _training_ids(work: WorkDir, cfg: RetrainConfig) -> tuple[torch.Tensor, dict]:
    ids = load_tensors(work.check_file(work.tokens_path))["input_ids"]
    if cfg.data is None:
        return ids, {"data": "calibration windows"}
    from transformers import AutoTokenizer

    src = resolve_text(cfg.data)
    text = read_text(src)
    tok = AutoTokenizer.from_pretrained(work.model_dir("dense"))
    out = sample_windows(tokenize(tok, text), cfg.samples or ids.shape[0], ids.shape[1], cfg.seed, cfg.allow_overlap)
    return out, {"data": src.spec, "data_sha": text_fingerprint(text)}


def retrain(work: WorkDir, cfg: RetrainConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False) -> dict:
    rep = rep or Reporter(quiet=True)
    cfg.validate()
    compute = parse_dtype(cfg.dtype)
    device = pick_device(cfg.device)
    work.require_done("calibrate" if cfg.start == "dense" else "prune", "retrain")
    if cfg.start == "latest":
        rc = work.stage("reconstruct")
        start = "reconstructed" if rc is not None and rc.status == "done" else "pruned"
    else:
        start = work.require_model(cfg.start)
    chosen = cfg.peft is None and start == "reconstructed"
    cfg = cfg.resolved(start)
    ids, data_sig = _training_ids(work, cfg)
    signature = {"from": start, "from_run": work.stage(STAGE_OF[start]).run_id, **data_sig, **cfg.signature()}
    with stage_lock(work, "retrain"):
        state = work.begin("retrain", signature, resume, force)
        if state == "done":
            return work.report_done("retrain", rep)
        t0 = time.time()
        model = materialize(work, start, device, torch.float32)
        arch = find_arch(model, model.config)
        layers = model.get_submodule(arch.layers_path)
        masks = {}  # by qualified name "i/mlp.up_proj"; none for the dense control: every weight trains
        for i in range(len(layers) if start != "dense" else 0):
            masks.update({f"{i}/{name}": keep for name, keep in load_tensors(work.check_file(work.mask_path(i)), device=device).items()})
        if cfg.grad_checkpoint:
            recompute_in_backward(layers)
        trainable = choose_trainable(model, layers, masks, cfg.peft_config())
        params = trainable.params
        n_train = sum(p.numel() for p in params.params)
        n = ids.shape[0]
        per_epoch = math.ceil(n / cfg.batch_size)
        total = cfg.steps or per_epoch * cfg.epochs
        opt = torch.optim.AdamW(params.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(int(total * cfg.warmup), total))
        ckpt_path = work.model_dir("retrained") / "checkpoint.pt"
        step, losses, before = 0, [], 0.0  # before: training seconds of earlier runs, so a resumed run reports the total
        if ckpt_path.exists():
            ck = torch.load(ckpt_path, map_location=device, weights_only=False)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            step, losses, before = ck["step"], ck["losses"], ck.get("seconds", 0.0)
            rep.info(f"retrain: resuming at step {step} of {total}")
        rep.info(f"retrain: the whole {start} model ({cfg.peft}, {n_train:,} trainable parameters), {total} steps of "
                 f"{cfg.batch_size} x {ids.shape[1]} tokens, lr {cfg.lr}"
                 + (" (the default after a reconstruction; --peft full trains every weight)" if chosen else ""))
        autocast = autocast_factory(device, compute)
        model.train(False)  # no dropout: the same deterministic forward as every other stage
        with rep.progress("retrain", total=total, completed=step) as bar:
            while step < total:
                epoch, offset = divmod(step, per_epoch)
                order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
                batch = ids[order[offset * cfg.batch_size : (offset + 1) * cfg.batch_size]].to(device)
                with autocast():
                    loss = next_token_loss(model, batch, HEAD_CHUNK if cfg.grad_checkpoint else None)
                masked_step(loss, opt, sched, params, cfg.grad_clip, "retraining", step)
                step += 1
                losses.append(loss.item())
                bar.advance()
                checkpoint("retrain.step")
                if step % cfg.save_every == 0 and step < total:
                    with atomic_open(ckpt_path) as f:  # streamed to disk: no in-memory copy of model + optimizer
                        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                    "step": step, "losses": losses, "seconds": before + time.time() - t0}, f)
        trainable.finalize()  # LoRA merged, masks re-applied: plain weights as sparse as the pruned model's
        _save(work, model, arch, layers, start, {id(trainable.linears[q].weight): keep for q, keep in masks.items()})
        ckpt_path.unlink(missing_ok=True)
        summary = {
            "work": str(work.root), "from": start, "steps": total, "tokens": total * cfg.batch_size * ids.shape[1],
            "first_loss": losses[0] if losses else None, "last_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else None,
            "trainable_params": n_train, "seconds": round(before + time.time() - t0, 2), "dtype": dtype_name(compute), "config": asdict(cfg),
        }
        work.finish("retrain", summary)
    rep.summary(f"retrained the {start} model for {total} steps ({summary['tokens']} tokens) in {summary['seconds']:.1f}s", summary)
    return summary


HEAD_CHUNK = 512  # positions per chunk of the head and loss under --grad-checkpoint: 512 x 49,152 floats = 100 MB


def next_token_loss(model, batch: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch``. With ``chunk``, the head and the loss run ``chunk`` positions at a
    time with their gradients taken on the way (head_loss), so the vocabulary-wide logits never exist whole: the
    head's share of --grad-checkpoint, at no extra compute."""
    targets = batch[:, 1:].reshape(-1)
    if chunk is None:
        logits = model(input_ids=batch, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets)
    hidden = model.base_model(input_ids=batch, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    return linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets, chunk)


def choose_trainable(model, layers, masks: dict, peft: PeftConfig) -> Trainable:
    """What trains. full: every parameter (embeddings and head too), pruned weights held at zero; bias-norm: every
    bias and norm of the model, the final norm included; lora / masked-lora: adapters on the blocks' linear layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    if peft.variant in ("lora", "masked-lora"):
        return prepare({f"{i}/": block for i, block in enumerate(layers)}, masks, peft)
    linears = {f"{i}/{name}": lin for i, block in enumerate(layers) for name, lin in block_linears(block).items()}
    if peft.variant == "bias-norm":
        return Trainable(prepare({"model": model}, {}, peft).params, linears, masks, lora=False)
    for p in model.parameters():
        p.requires_grad_(True)
    by_id = {id(linears[q].weight): keep for q, keep in masks.items()}
    return Trainable(MaskedParams(list(model.parameters()), by_id), linears, masks, lora=False)


def recompute_in_backward(layers) -> None:
    """Gradient checkpointing per decoder block: the forward keeps only each block's input and backward reruns the
    block, so activation memory is one block's instead of the whole model's. Done here rather than through
    transformers' switch, which only acts in train mode (we train in eval mode: no dropout, as in every other stage)."""
    for block in layers:
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


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
    rest = {k: v.detach().to(storage) for k, v in model.state_dict().items()
            if not k.startswith(prefix) and not (tied and k.endswith("lm_head.weight"))}
    path = work.model_dir("retrained") / "rest.safetensors"
    work.record_file(path, save_tensors_atomic(path, rest))

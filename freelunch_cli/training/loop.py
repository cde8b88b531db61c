"""The training loop of a reconstruction window, and the masked optimizer step global retraining shares with it:
AdamW on pruned weights held at exactly zero (masked gradients, masks re-applied after every step)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.kill_points import kill_point

LOSSES = ("mse", "nmse", "cosine")


@dataclass
class TrainConfig:
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 4
    seed: int = 0
    weight_decay: float = 0.0
    loss: str = "mse"
    steps: int | None = None  # overrides epochs
    warmup: float = 0.0  # fraction of the steps with a linear warm-up
    grad_clip: float | None = None
    keep_best: bool = False  # keep the parameters with the lowest validation loss (needs validation samples)
    loss_samples: int | None = 32  # training samples the reported before/after loss is measured on (None: all)

    def validate(self) -> None:
        loss_fn(self.loss)
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or (self.steps is not None and self.steps < 1):
            raise FreelunchError("--lr must be positive; --epochs, --steps and --batch-size at least 1")
        if not 0 <= self.warmup < 1:
            raise FreelunchError("--warmup is a fraction of the steps, in [0, 1)")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise FreelunchError("--grad-clip must be positive")
        if self.loss_samples is not None and self.loss_samples < 1:
            raise FreelunchError("--loss-samples must be at least 1")


def loss_fn(name: str):
    if name == "mse":
        return lambda y, t: torch.mean((y - t) ** 2)
    if name == "nmse":
        return lambda y, t: torch.mean((y - t) ** 2) / torch.mean(t**2).clamp_min(1e-12)
    if name == "cosine":
        return lambda y, t: 1.0 - torch.nn.functional.cosine_similarity(y.flatten(0, -2), t.flatten(0, -2), dim=-1).mean()
    raise FreelunchError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")


class MaskedParams:
    """Trainable parameters, some of them with a keep-mask that must stay exactly zero where False."""

    def __init__(self, params: list[nn.Parameter], masks: dict[int, torch.Tensor]):
        self.params = params
        self.masks = masks  # id(param) -> bool mask on the param's device

    def mask_grads(self) -> None:
        for p in self.params:
            m = self.masks.get(id(p))
            if m is not None and p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def apply(self) -> None:
        for p in self.params:
            m = self.masks.get(id(p))
            if m is not None:
                p.mul_(m)

    def count(self) -> tuple[int, int]:
        """(trainable elements, trainable elements not held at zero by a mask)."""
        total = sum(p.numel() for p in self.params)
        free = sum(int(self.masks[id(p)].sum()) if id(p) in self.masks else p.numel() for p in self.params)
        return total, free

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self.params, values):
            p.copy_(v)


def _batches(indices: list[int], batch_size: int, generator: torch.Generator | None):
    order = (
        [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        if generator is not None
        else list(indices)
    )
    for s in range(0, len(order), batch_size):
        yield sorted(order[s : s + batch_size])


def autocast_factory(device, compute_dtype):
    """A context factory: autocast to the compute dtype, or nothing for float32."""
    if compute_dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device_type=torch.device(device).type, dtype=compute_dtype)


def linear_schedule(warm: int, total: int):
    """Learning-rate factor: linear warm-up over ``warm`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, 1.0 - (step - warm) / max(total - warm, 1))

    return factor


def masked_step(loss: torch.Tensor, opt, sched, params: MaskedParams, grad_clip: float | None, what: str, step: int) -> None:
    """One AdamW step that keeps pruned weights at exactly zero (masked gradients, masks re-applied)."""
    if not torch.isfinite(loss):
        raise FreelunchError(f"{what} loss became {float(loss)} at step {step}; lower --lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params.mask_grads()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params.params, grad_clip)
    opt.step()
    sched.step()
    params.apply()


def mean_loss(forward, data, indices: list[int], loss, batch_size: int, autocast) -> float:
    """Mean of ``loss(forward(x), target)`` over the given samples, weighted by batch size (NaN for no samples)."""
    if not indices:
        return float("nan")
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in _batches(indices, batch_size, None):
            x, t = data.batch(idx)
            with autocast():
                y = forward(x)
            total += float(loss(y.float(), t)) * len(idx)
            count += len(idx)
    return total / max(count, 1)


def train_window(
    forward,
    params: MaskedParams,
    data,
    train_idx: list[int],
    val_idx: list[int],
    cfg: TrainConfig,
    device,
    compute_dtype,
    on_step=None,
    extra_loss=None,
) -> dict:
    """AdamW with linear warm-up and decay on ``loss(forward(x), target)`` (plus ``extra_loss(y, target)``
    when given); returns the losses before and after."""
    base = loss_fn(cfg.loss)
    loss = base if extra_loss is None else (lambda y, t: base(y, t) + extra_loss(y, t))
    autocast = autocast_factory(device, compute_dtype)
    eval_bs = max(cfg.batch_size, 8)
    probe = train_idx if cfg.loss_samples is None else train_idx[: cfg.loss_samples]  # a fixed subset: the report is cheap
    before = mean_loss(forward, data, probe, loss, eval_bs, autocast)
    if not math.isfinite(before):
        raise FreelunchError(
            f"the loss before training is {before}: the window's inputs or targets hold NaN or infinite values (the activation "
            f"cache overflowed); recalibrate with --dtype bfloat16 or float32"
        )
    val_before = mean_loss(forward, data, val_idx, loss, eval_bs, autocast)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else steps_per_epoch * cfg.epochs
    best = (val_before, 0, params.snapshot()) if cfg.keep_best and val_idx else None
    step = 0
    if params.params:
        opt = torch.optim.AdamW(params.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(int(total * cfg.warmup), total))
        gen = torch.Generator().manual_seed(cfg.seed)
        while step < total:
            for idx in _batches(train_idx, cfg.batch_size, gen):
                x, t = data.batch(idx)
                with autocast():
                    y = forward(x)
                value = loss(y.float(), t)
                masked_step(value, opt, sched, params, cfg.grad_clip, "reconstruction", step)
                step += 1
                kill_point("train.step")
                if on_step is not None:
                    on_step(step, total, float(value))
                if step >= total:
                    break
            if best is not None:
                v = mean_loss(forward, data, val_idx, loss, eval_bs, autocast)
                if v < best[0]:
                    best = (v, step, params.snapshot())
        del opt
    if best is not None:
        params.restore(best[2])
    after = mean_loss(forward, data, probe, loss, eval_bs, autocast)
    val_after = mean_loss(forward, data, val_idx, loss, eval_bs, autocast)
    out = {"loss_before": before, "loss_after": after, "loss_samples": len(probe), "steps": step}
    if val_idx:
        out.update(val_loss_before=val_before, val_loss_after=val_after)
    if best is not None:
        out["best_step"] = best[1]
    return out

"""Training one reconstruction window: match the dense activations with pruned weights held at zero."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from freelunch_cli.errors import FreelunchError

LOSSES = ("mse", "nmse", "cosine")


@dataclass
class TrainConfig:
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 4
    seed: int = 0
    weight_decay: float = 0.0
    loss: str = "mse"


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

    def check(self) -> None:
        for p in self.params:
            m = self.masks.get(id(p))
            if m is not None and bool((p.detach()[~m] != 0).any()):
                raise RuntimeError("a pruned weight became nonzero during reconstruction")

    def count(self) -> tuple[int, int]:
        """(trainable elements, trainable elements not held at zero by a mask)."""
        total = sum(p.numel() for p in self.params)
        free = sum(int(self.masks[id(p)].sum()) if id(p) in self.masks else p.numel() for p in self.params)
        return total, free


def _batches(n: int, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for s in range(0, n, batch_size):
        yield sorted(order[s : s + batch_size].tolist())


def evaluate(forward, inputs, targets, loss, device, batch_size: int, autocast) -> float:
    """Mean loss over every sample (weighted by batch size)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in _batches(len(inputs), batch_size, None):
            x = inputs.take(idx).to(device, torch.float32)
            t = targets.take(idx).to(device, torch.float32)
            with autocast():
                y = forward(x)
            total += float(loss(y.float(), t)) * len(idx)
            count += len(idx)
    return total / max(count, 1)


def train_window(forward, params: MaskedParams, inputs, targets, cfg: TrainConfig, device, compute_dtype, on_step=None) -> dict:
    """AdamW with linear learning-rate decay on ``loss(forward(x), target)``; returns losses before/after."""
    loss = loss_fn(cfg.loss)
    autocast = (
        (lambda: torch.autocast(device_type=torch.device(device).type, dtype=compute_dtype))
        if compute_dtype != torch.float32
        else nullcontext
    )
    eval_bs = max(cfg.batch_size, 8)
    before = evaluate(forward, inputs, targets, loss, device, eval_bs, autocast)
    n = len(inputs)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(params.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total))
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    for _ in range(cfg.epochs):
        for idx in _batches(n, cfg.batch_size, gen):
            x = inputs.take(idx).to(device, torch.float32)
            t = targets.take(idx).to(device, torch.float32)
            with autocast():
                y = forward(x)
            value = loss(y.float(), t)
            if not torch.isfinite(value):
                raise FreelunchError(f"reconstruction loss became {float(value)} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            value.backward()
            params.mask_grads()
            opt.step()
            sched.step()
            params.apply()
            step += 1
            if on_step is not None:
                on_step(step, total, float(value))
    params.check()
    after = evaluate(forward, inputs, targets, loss, device, eval_bs, autocast)
    return {"loss_before": before, "loss_after": after, "steps": step}

"""The training loop of a reconstruction window, and the masked optimizer step global retraining shares with it:
AdamW on pruned weights held at exactly zero (masked gradients, masks re-applied after every step)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from freelunch_cli.core.device import host_sync, no_host_sync
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.kill_points import kill_point

LOSSES = ("mse", "nmse", "cosine")
RETRY_FACTOR = 0.1  # the rate of a window's next attempt, after its held-out loss rose
RMS_FLOOR = 1e-3  # a relative rate's RMS for a tensor smaller than this (zeros, new biases), as Adafactor's eps2


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
    relative_lr: bool = False  # lr is a fraction of each tensor's RMS (one without an lr factor), not a rate
    retries: int = 0  # a window ending above its starting held-out loss starts over at RETRY_FACTOR x the rate, this often

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
        if self.retries < 0:
            raise FreelunchError("--retries must be at least 0")


def loss_fn(name: str):
    if name == "mse":
        return lambda y, t: torch.mean((y - t) ** 2)
    if name == "nmse":
        return lambda y, t: torch.mean((y - t) ** 2) / torch.mean(t**2).clamp_min(1e-12)
    if name == "cosine":
        return lambda y, t: 1.0 - torch.nn.functional.cosine_similarity(y.flatten(0, -2), t.flatten(0, -2), dim=-1).mean()
    raise FreelunchError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")


class MaskedParams:
    """Trainable parameters, some of them with a keep-mask that must stay exactly zero where False, and some with their
    own learning rate (``lr_factors``: id(param) -> multiple of the run's rate, e.g. quantization scales)."""

    def __init__(self, params: list[nn.Parameter], masks: dict[int, torch.Tensor], lr_factors: dict[int, float] | None = None):
        self.params = params
        self.masks = masks  # id(param) -> bool mask on the param's device
        self.lr_factors = lr_factors or {}

    def groups(self, lr: float, relative: bool = False) -> list[dict]:
        """Optimizer parameter groups: one per learning rate. With ``relative``, ``lr`` is a fraction of each tensor's
        root mean square (at least ``RMS_FLOOR``; Adafactor's relative step size), so that the step is the same on
        models whose weights differ in scale; tensors with an lr factor (dimensionless: quantization scales' log
        factors) take ``lr`` times their factor as before."""
        if relative:
            groups = []
            for p in self.params:
                factor = self.lr_factors.get(id(p))
                rate = lr * factor if factor is not None else lr * max(float(p.detach().float().pow(2).mean().sqrt()), RMS_FLOOR)
                groups.append({"params": [p], "lr": rate})
            return groups
        by_factor: dict[float, list] = {}
        for p in self.params:
            by_factor.setdefault(self.lr_factors.get(id(p), 1.0), []).append(p)
        return [{"params": ps, "lr": lr * f} for f, ps in by_factor.items()]

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
        """A copy of every parameter in host memory (a window's starting or best values: never device memory that
        the window's memory estimate did not count)."""
        return [p.detach().to("cpu", copy=True) for p in self.params]

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


PREFETCH: bool | None = None  # stage the next batch on a background thread; None: on CUDA only (tests force it on)


def prefetching(device) -> bool:
    """Whether batches on ``device`` are staged ahead by a background thread (``PREFETCH``, or CUDA when it is None)."""
    return PREFETCH if PREFETCH is not None else torch.device(device).type == "cuda"


def _prefetched(data, batches, ahead: bool):
    """``data.batch(idx)`` for each index list, always called on this thread (it may compute: dense references run
    here). With ``ahead`` and a ``data.prefetch``, a background thread stages the next batch meanwhile: it reads it
    from disk into pinned memory and copies it to the device without blocking (I/O and copies only, nothing that
    computes), and ``data.batch`` then takes what was staged. An error of the thread is raised here."""
    prefetch = getattr(data, "prefetch", None) if ahead else None
    if prefetch is None:
        yield from (data.batch(idx) for idx in batches)
        return
    order = iter(batches)
    idx = next(order, None)
    if idx is None:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="freelunch-prefetch") as pool:
        staged = pool.submit(prefetch, idx)
        while idx is not None:
            staged.result()  # this batch is staged (waits on the thread, never on the device)
            nxt = next(order, None)
            batch = data.batch(idx)
            if nxt is not None:
                staged = pool.submit(prefetch, nxt)  # the next one is read while this one trains
            yield batch
            idx = nxt


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


class Diverged(FreelunchError):
    """A training loss became NaN or infinite."""


class MaskedOptimizer:
    """AdamW with a linear schedule that keeps pruned weights at exactly zero (masked gradients, masks re-applied after
    every step), fused on CUDA, with a gradient scaler for float16 autocast.

    The loss is checked for NaN and infinity every ``check_every`` steps and at ``finish()``, on the device, so that a
    step needs no round trip to the host. Raises FreelunchError naming ``what`` and the steps when a loss was not finite.
    """

    check_every = 16

    def __init__(
        self,
        params: MaskedParams,
        lr: float,
        weight_decay: float,
        warmup: int,
        total: int,
        device,
        compute_dtype: torch.dtype,
        grad_clip: float | None,
        what: str,
        relative_lr: bool = False,
    ):
        device = torch.device(device)
        self.params, self.grad_clip, self.what = params, grad_clip, what
        groups = params.groups(lr, relative_lr)
        self.opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda" or None)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, linear_schedule(warmup, total))
        self.scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None
        self.steps = 0
        self.agree = None  # sharded training: and-s the finite flag over every process, so all stop at the same check
        self._finite = torch.ones((), dtype=torch.bool, device=device)
        self._checked = 0

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss`` (a float32 scalar)."""
        self._finite &= torch.isfinite(loss.detach())
        self.opt.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)  # masks and clipping act on the true gradients
        self.params.mask_grads()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params.params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.params.apply()
        self.steps += 1
        if self.steps - self._checked >= self.check_every:
            self.check()

    def check(self) -> None:
        """Raise FreelunchError if a loss since the last check was NaN or infinite (the one host sync of a step)."""
        finite = self._finite if self.agree is None else self.agree(self._finite)
        with host_sync():
            ok = bool(finite)
        if not ok:
            raise Diverged(f"{self.what} loss became NaN or infinite within steps {self._checked}-{self.steps - 1}; lower --lr")
        self._checked = self.steps

    def finish(self) -> None:
        self.check()

    def state_dict(self) -> dict:
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}
        return state if self.scaler is None else {**state, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, steps: int) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.steps = self._checked = steps


def mean_loss(forward, data, indices: list[int], loss, batch_size: int, autocast, ahead: bool = False) -> float:
    """Mean of ``loss(forward(x), target)`` over the given samples, weighted by batch size (NaN for no samples);
    ``ahead``: batches staged by a background thread (``_prefetched``)."""
    if not indices:
        return float("nan")
    total, count = 0.0, 0
    with torch.no_grad(), closing(_prefetched(data, _batches(indices, batch_size, None), ahead)) as batches:
        for idx, (x, t) in zip(_batches(indices, batch_size, None), batches):
            with autocast():
                y = forward(x)
            total = total + loss(y.float(), t).double() * len(idx)  # summed on the device: one transfer at the end
            count += len(idx)
    return float(total) / max(count, 1)


def train_window(
    forward,
    params: MaskedParams,
    data,
    train_idx: list[int],
    val_idx: list[int],
    cfg: TrainConfig,
    device,
    compute_dtype,
    extra_loss=None,
    on_step=None,
) -> dict:
    """AdamW with linear warm-up and decay on ``loss(forward(x), target)`` (plus ``extra_loss(y, target)``
    when given); returns the losses before and after (float, on ``loss_samples`` training samples and on ``val_idx``).

    A window never ends worse than it started: when its loss on the held-out samples ``val_idx`` (without any, on the
    reported training samples) ends above where it began, or a loss becomes NaN or infinite, its parameters go back
    to their starting values and it trains again at ``RETRY_FACTOR`` x the rate, up to ``cfg.retries`` times; when no
    attempt ends at or below the start, it keeps its starting parameters. The result says so: ``lr`` (the rate of
    the attempt kept), ``rejected`` (each attempt given up: its rate and the loss it reached, None when it diverged)
    and ``kept_start``.

    ``on_step()``, when given, is called after every optimizer step (a sharded worker's heartbeat: a claim is kept
    alive by progress, not by a clock). Raises FreelunchError when the loss before training is not finite (the
    window's data overflowed).
    """
    base = loss_fn(cfg.loss)
    loss = base if extra_loss is None else (lambda y, t: base(y, t) + extra_loss(y, t))
    autocast = autocast_factory(device, compute_dtype)
    ahead = prefetching(device)
    eval_bs = max(cfg.batch_size, 8)
    probe = train_idx if cfg.loss_samples is None else train_idx[: cfg.loss_samples]  # a fixed subset: the report is cheap
    before = mean_loss(forward, data, probe, loss, eval_bs, autocast, ahead)
    if not math.isfinite(before):
        raise FreelunchError(
            f"the loss before training is {before}: the window's inputs or targets hold NaN or infinite values (the activation "
            f"cache overflowed); recalibrate with --dtype bfloat16 or float32"
        )
    val_before = mean_loss(forward, data, val_idx, loss, eval_bs, autocast, ahead)
    if val_idx and not math.isfinite(val_before):
        raise FreelunchError(
            f"the held-out loss before training is {val_before}: the window's held-out inputs or targets hold NaN or "
            f"infinite values (the activation cache overflowed); recalibrate with --dtype bfloat16 or float32"
        )
    guard_idx, guard_before = (val_idx, val_before) if val_idx else (probe, before)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else steps_per_epoch * cfg.epochs
    lr, rejected, step, best_step, kept_start = cfg.lr, [], 0, None, False
    if params.params and total > 0:  # no step (round-to-nearest): nothing to guard
        start = params.snapshot()
        for attempt in range(cfg.retries + 1):
            try:
                step, best_step = _train(
                    forward, params, data, train_idx, val_idx, cfg, lr, total, loss, device, compute_dtype, on_step
                )
                guard_after = mean_loss(forward, data, guard_idx, loss, eval_bs, autocast, ahead)
            except Diverged:
                guard_after = float("nan")
            if guard_after <= guard_before:  # False for NaN
                break
            rejected.append({"lr": lr, "loss": guard_after if math.isfinite(guard_after) else None})
            params.restore(start)
            if attempt < cfg.retries:
                lr *= RETRY_FACTOR
        else:
            kept_start, step, best_step, lr = True, 0, None, None
        del start
    trained = step > 0
    after = mean_loss(forward, data, probe, loss, eval_bs, autocast, ahead) if trained else before  # no step: the same model
    val_after = mean_loss(forward, data, val_idx, loss, eval_bs, autocast, ahead) if trained else val_before
    out = {"loss_before": before, "loss_after": after, "loss_samples": len(probe), "steps": step}
    if val_idx:
        out.update(val_loss_before=val_before, val_loss_after=val_after)
    if best_step is not None:
        out["best_step"] = best_step
    if params.params:
        out.update(lr=lr, guard="held-out" if val_idx else "training")
    if rejected:
        out.update(rejected=rejected, kept_start=kept_start)
    return out


def _train(
    forward,
    params: MaskedParams,
    data,
    train_idx,
    val_idx,
    cfg: TrainConfig,
    lr: float,
    total: int,
    loss,
    device,
    compute_dtype,
    on_step=None,
):
    """``total`` optimizer steps at peak rate ``lr`` (with ``cfg.keep_best``: the parameters restored to the epoch
    with the lowest validation loss); returns (steps, the step kept by keep_best or None). Raises Diverged."""
    autocast = autocast_factory(device, compute_dtype)
    ahead = prefetching(device)
    eval_bs = max(cfg.batch_size, 8)
    best = None
    if cfg.keep_best and val_idx:
        best = (mean_loss(forward, data, val_idx, loss, eval_bs, autocast, ahead), 0, params.snapshot())
    opt = MaskedOptimizer(
        params,
        lr,
        cfg.weight_decay,
        int(total * cfg.warmup),
        total,
        device,
        compute_dtype,
        cfg.grad_clip,
        "reconstruction",
        cfg.relative_lr,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    while step < total:
        epoch = closing(_prefetched(data, _batches(train_idx, cfg.batch_size, gen), ahead))
        with epoch as batches, no_host_sync(device):  # closed on break: the prefetching thread is done after
            for x, t in batches:
                with autocast():
                    y = forward(x)
                opt.step(loss(y.float(), t))
                step += 1
                kill_point("train.step")
                if on_step is not None:
                    on_step()
                if step >= total:
                    break
        if best is not None:
            opt.check()
            v = mean_loss(forward, data, val_idx, loss, eval_bs, autocast, ahead)
            if v < best[0]:
                best = (v, step, params.snapshot())
    opt.finish()
    del opt
    if best is not None:
        params.restore(best[2])
        return step, best[1]
    return step, None

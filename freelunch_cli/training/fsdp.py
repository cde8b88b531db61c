"""Global retraining across processes on PyTorch's own engine: FSDP2 (``torch.distributed.fsdp.fully_shard``) with
sharded checkpoints (``torch.distributed.checkpoint``).

Under ``torchrun`` every process holds ``1/world`` of every parameter, gradient, AdamW moment and keep-mask. The
model is built on the meta device, sharded (one FSDP unit per decoder block, one for the embeddings, final norm and
head), then filled one block at a time from full tensors (``load_full``), so no process ever holds the whole model.
At the end each block is gathered whole (``gather_full``), one block at a time, for writing.

Pure tensors and modules: the retrain stage reads and writes the work directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from freelunch_cli.training.peft import LoRA


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes of one run."""

    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def torchrun_world(env: dict | None = None) -> World | None:
    """The torchrun world this process belongs to (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or None for a single
    process (no torchrun, or a world of one; ``FREELUNCH_FSDP=1`` shards a world of one too, so that one GPU checks
    the sharded path: bench/gpu_check.sh)."""
    env = os.environ if env is None else env
    one = env.get("FREELUNCH_FSDP") == "1"
    if "RANK" not in env or int(env.get("WORLD_SIZE", "1")) < (1 if one else 2):
        return None
    return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))


def init_group(world: World, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes (tests, CPU clusters)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)


def barrier() -> None:
    dist.barrier()


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value, src: int = 0):
    """A picklable ``value`` of rank ``src`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_finite(flag: torch.Tensor) -> torch.Tensor:
    """``flag`` (bool scalar) and-ed over every rank: a NaN loss on one rank stops them all at the same step."""
    as_int = flag.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MIN)
    return as_int.to(torch.bool)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``values`` over every rank (for the reported per-step losses)."""
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def shard_masks_of_adapters(model: nn.Module) -> None:
    """Masked-LoRA keeps each keep-mask in its adapter as a buffer, which FSDP would copy to every process (one byte a
    weight: 70 GB for a 70B model). Make them frozen parameters, so they are sharded like the weights they mask."""
    for m in model.modules():
        if isinstance(m, LoRA) and m.mask is not None:
            mask = m._buffers.pop("mask")
            m.mask = nn.Parameter(mask, requires_grad=False)


def shard(model: nn.Module, layers, compute_dtype: torch.dtype) -> None:
    """``fully_shard`` every decoder block, then the root (embeddings, final norm and head, tied or not). In a 16-bit
    ``compute_dtype`` the gathered parameters are cast to it for the forward and backward, and gradients are reduced
    in float32 (FSDP2's ``MixedPrecisionPolicy``); float32 computes as stored."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy()
        if compute_dtype == torch.float32
        else MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    )
    for block in layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def load_full(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (keys as in ``model.state_dict()``; any subset, e.g. one block) into their shards: each process
    keeps its own slice. Every rank must call this with the same keys."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def distribute_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` sharded as ``param`` is (a keep-mask next to its sharded weight); ``full`` itself when ``param`` is not
    sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full.to(param.device)
    return distribute_tensor(full.to(param.to_local().device), param.device_mesh, param.placements)


def gather_full(module: nn.Module, keep=None) -> dict[str, torch.Tensor]:
    """The full tensors of ``module``'s state (those whose key ``keep(key)`` accepts) on the CPU. A collective: every
    rank calls it, in the same order."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in module.state_dict().items():
        if keep is not None and not keep(name):
            continue
        full = value.full_tensor() if isinstance(value, DTensor) else value
        out[name] = full.detach().cpu()
    return out


# ---- sharded checkpoints ---------------------------------------------------------------------------------------
POINTER = "checkpoint.json"  # names the last complete checkpoint folder; written last, atomically


def save_checkpoint(folder: Path, model: nn.Module, optimizer, meta: dict, world: World, write_json) -> None:
    """Write model and optimizer shards with ``torch.distributed.checkpoint`` into ``folder/step-NNNNNN``, then point
    ``folder/checkpoint.json`` at it (``meta`` plus the world size) and delete older checkpoints. A run killed while
    writing leaves the previous checkpoint in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"step-{meta['step']:06d}"
    target = folder / name
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(target))
    dist.barrier()
    if world.main:
        write_json(folder / POINTER, {**meta, "folder": name, "world_size": world.size})
        remove_checkpoints(folder, but=name)
    dist.barrier()


def read_pointer(folder: Path) -> dict | None:
    """What the last complete sharded checkpoint in ``folder`` recorded (step, losses, world size...), or None."""
    import json

    path = folder / POINTER
    return json.loads(path.read_text()) if path.exists() else None


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> None:
    """Load the sharded checkpoint folder ``path`` (one ``step-NNNNNN``) into the sharded ``model`` and ``optimizer``.
    The caller checks first that it was written by this number of processes (``checkpoint.json``'s world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def remove_checkpoints(folder: Path, but: str | None = None) -> None:
    """Delete the sharded checkpoints in ``folder`` (all, or all but the one named ``but``; the pointer goes with
    them)."""
    import shutil

    for old in folder.glob("step-*"):
        if old.name != but:
            shutil.rmtree(old, ignore_errors=True)
    if but is None:
        shutil.rmtree(folder, ignore_errors=True)


def world_size_mismatch(step: int | None, written: int, now: int) -> str:
    """The one-line refusal to resume a checkpoint on another number of processes."""

    def procs(n: int) -> str:
        return "1 process (no torchrun)" if n == 1 else f"{n} processes"

    run = (
        "in one process, without torchrun" if written == 1 else f"with {written} processes (torchrun --nproc-per-node {written})"
    )
    return (
        f"the retraining checkpoint{'' if step is None else f' at step {step}'} was written by {procs(written)}, but this run has {procs(now)}: "
        f"resume {run}, or pass --force to start retraining over"
    )

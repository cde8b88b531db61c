"""Device and dtype choices shared by every stage."""

from __future__ import annotations

import torch

from freelunch_cli.core.dtypes import canonical_dtype
from freelunch_cli.core.errors import FreelunchError


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of an option's value (``bf16``, ``float32``, ...); FreelunchError for an unknown one."""
    return getattr(torch, canonical_dtype(name))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device (or LOCAL_RANK's under torchrun) when present, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            import os

            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise FreelunchError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FreelunchError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()

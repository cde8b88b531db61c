"""The device policy, in one place: which device a process computes on, in which dtype, and how matrix products run.

- ``--device auto`` is CUDA when present, else the CPU; ``auto`` and a bare ``cuda`` mean ``cuda:$LOCAL_RANK`` (each
  torchrun rank its own GPU), and the process's current CUDA device is set to it.
- On CUDA, float32 matrix products use TF32 everywhere (``--device auto`` and ``--device cuda`` alike), except inside
  SparseGPT's Hessian and its inverse (``exact_matmul``), which the reference code keeps exact.
- ``--dtype auto`` is bfloat16 on CUDA (autocast; master weights, optimizer state and losses stay float32) and float32
  on the CPU. float16 training runs with a gradient scaler (``training.loop``).
- ``FREELUNCH_DETERMINISTIC=1`` turns on ``torch.use_deterministic_algorithms`` (and the cuBLAS workspace setting it
  needs on CUDA): a resumed run then repeats an uninterrupted one bit for bit on CUDA too; the CPU always does.
- ``FREELUNCH_SYNC_DEBUG=warn|error`` (tests, the GPU check): inside a training loop's steps, every host sync on CUDA
  warns or fails (``torch.cuda.set_sync_debug_mode``), except the intended ones (``host_sync``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from freelunch_cli.core.dtypes import canonical_dtype
from freelunch_cli.core.errors import FreelunchError

DETERMINISTIC_ENV = "FREELUNCH_DETERMINISTIC"
SYNC_DEBUG_ENV = "FREELUNCH_SYNC_DEBUG"
CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to be deterministic (CUDA's documentation); 24 MiB per stream


def deterministic_requested(env: dict | None = None) -> bool:
    """Whether ``FREELUNCH_DETERMINISTIC`` asks for deterministic algorithms (1/true/yes; 0/false/no/empty: no).
    Raises FreelunchError for another value."""
    value = (os.environ if env is None else env).get(DETERMINISTIC_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise FreelunchError(f"{DETERMINISTIC_ENV}={value!r}: use 1 (deterministic algorithms) or 0")


def use_deterministic(on: bool) -> None:
    """Deterministic algorithms on or off, process-wide: ``torch.use_deterministic_algorithms`` (an operation without a
    deterministic implementation then raises), cuDNN without benchmarking, and ``CUBLAS_WORKSPACE_CONFIG`` (set
    before cuBLAS starts, when not set already)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False


if os.environ.get(DETERMINISTIC_ENV, "").strip().lower() in ("1", "true", "yes"):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # at import: before any CUDA work starts cuBLAS


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of an option's value (``bf16``, ``float32``, ...); FreelunchError for an unknown one."""
    return getattr(torch, canonical_dtype(name))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str = "auto", env: dict | None = None) -> torch.device:
    """The device of ``--device``: ``auto`` and ``cuda`` are ``cuda:$LOCAL_RANK`` (``auto``: the CPU without CUDA);
    on CUDA it becomes the current device and TF32 matrix products are switched on. With ``FREELUNCH_DETERMINISTIC``
    set, deterministic algorithms are switched on (``use_deterministic``).

    Raises FreelunchError for an unknown name, CUDA asked for without CUDA, or a GPU index the node lacks.
    """
    env = os.environ if env is None else env
    if deterministic_requested(env):
        use_deterministic(True)
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        name = f"cuda:{int(env.get('LOCAL_RANK', 0))}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FreelunchError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise FreelunchError(f"--device {name}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if device.index is None or device.index >= count:
        raise FreelunchError(
            f"--device {name}: this node has {count} GPU(s) (cuda:0 to cuda:{count - 1}); under torchrun, "
            f"start at most {count} processes per node"
        )
    torch.cuda.set_device(device)
    allow_tf32(True)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype of ``--dtype``: ``auto`` is bfloat16 on CUDA (float16 on GPUs without bfloat16), float32 on
    the CPU; any other name as given."""
    if name != "auto":
        return parse_dtype(name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def allow_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


@contextmanager
def exact_matmul():
    """Full float32 matrix products inside (SparseGPT's Hessian and inverse), TF32 again after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    allow_tf32(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``--device`` and ``--dtype`` of a stage, by the policy above."""
    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved)


def free_memory(device: torch.device) -> None:
    """Return cached device memory between windows."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def available_memory(device: torch.device) -> int:
    """Bytes a stage may still use on ``device``: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@contextmanager
def no_host_sync(device):
    """Inside, on CUDA with ``FREELUNCH_SYNC_DEBUG`` warn or error, a host sync warns or raises RuntimeError
    (``torch.cuda.set_sync_debug_mode``); otherwise it does nothing. Raises FreelunchError for another value."""
    mode = os.environ.get(SYNC_DEBUG_ENV, "")
    if not mode or torch.device(device).type != "cuda":
        yield
        return
    if mode not in ("warn", "error"):
        raise FreelunchError(f"{SYNC_DEBUG_ENV}={mode!r}: use warn or error")
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@contextmanager
def host_sync():
    """An intended host sync (the loss check every few steps) inside ``no_host_sync``: not reported."""
    if not torch.cuda.is_available() or torch.cuda.get_sync_debug_mode() == 0:
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)

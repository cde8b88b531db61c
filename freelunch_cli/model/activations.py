"""Activation caches: hidden states ``[samples, seqlen, hidden]`` written batch by batch, range-checked on the way."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from freelunch_cli.core.device import dtype_name
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.workdir.files import StreamingTensorWriter

WIDER = {torch.float16: torch.bfloat16}  # float32's range in the same two bytes: the planned cache size still holds


class _BeyondRange(Exception):
    def __init__(self, peak: float):
        self.peak = peak


def write_activations(
    work,
    path: Path,
    producer: Callable[[slice], torch.Tensor],
    samples: int,
    seqlen: int,
    hidden: int,
    dtype: torch.dtype,
    batch_size: int,
    what: str,
    log: Callable[[str], None] | None = None,
    restart: Callable[[], None] | None = None,
) -> torch.dtype:
    """Compute an activation cache file batch by batch (``producer(rows)`` gives rows ``[b, seqlen, hidden]``) in
    ``dtype`` and record it in ``work``'s manifest; return the dtype the file holds. ``what`` says where the rows come
    from, for errors.

    A file whose values exceed float16's range (65504; real models' residual streams do) is written again from its
    first row in bfloat16, which has float32's range in the same two bytes: ``restart()`` is called before (so that
    what the producer gathers on the way starts over) and ``log`` is told. The file's header records its dtype, so
    each file of a cache may have its own; readers take it from there.

    Raises FreelunchError when a value is NaN or infinite (naming the file, its source and the compute dtypes that
    help); nothing is recorded then.
    """
    try:
        _write(work, path, producer, samples, seqlen, hidden, dtype, batch_size, what)
        return dtype
    except _BeyondRange as e:
        wider = WIDER[dtype]
        if log is not None:
            log(
                f"hidden states in {path.name} reach {e.peak:.0f}, beyond {dtype_name(dtype)}'s range "
                f"({torch.finfo(dtype).max:.0f}): stored in {dtype_name(wider)}"
            )
        if restart is not None:
            restart()
        _write(work, path, producer, samples, seqlen, hidden, wider, batch_size, what)
        return wider


def _write(work, path, producer, samples, seqlen, hidden, dtype, batch_size, what) -> None:
    """One attempt of ``write_activations`` in ``dtype``; raises _BeyondRange (the file discarded) when a value
    exceeds the range of a dtype that has a wider one."""
    limit = torch.finfo(dtype).max
    with StreamingTensorWriter(path, "hidden", (samples, seqlen, hidden), dtype) as w, torch.no_grad():
        for start in range(0, samples, batch_size):
            out = producer(slice(start, min(start + batch_size, samples)))
            peak = float(out.abs().amax())  # NaN when any value is NaN: one pass checks both
            if not math.isfinite(peak):
                raise FreelunchError(
                    f"{what} holds NaN or infinite values ({path.name}, samples {start}-{start + out.shape[0] - 1}): the "
                    f"computation overflowed; use --dtype bfloat16 or float32 (float16 ends at 65504)"
                )
            if peak > limit:
                if dtype in WIDER:
                    raise _BeyondRange(peak)
                raise FreelunchError(f"hidden states in {path.name} reach {peak:.0f}, beyond {dtype_name(dtype)}'s range")
            w.append(out)
    work.record_file(path, w.info)


def cache_dtype_of(rows) -> torch.dtype:
    """The torch dtype of a ``TensorRows`` file (safetensors names it F16, BF16 or F32)."""
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[rows.dtype]

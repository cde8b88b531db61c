"""Activation caches: hidden states ``[samples, seqlen, hidden]`` written batch by batch, range-checked on the way."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from freelunch_cli.core.device import dtype_name
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.workdir.files import StreamingTensorWriter


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
) -> None:
    """Compute an activation cache file batch by batch (``producer(rows)`` gives rows ``[b, seqlen, hidden]``) in
    ``dtype`` and record it in ``work``'s manifest. ``what`` says where the rows come from, for errors.

    Raises FreelunchError when a value is NaN or infinite (naming the file, its source and the compute dtypes that
    help) or exceeds ``dtype``'s range (naming --cache-dtype); nothing is recorded then.
    """
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
                raise FreelunchError(
                    f"hidden states in {path.name} reach {peak:.0f}, beyond {dtype_name(dtype)}'s range; "
                    f"rerun calibrate with --cache-dtype bfloat16 --force"
                )
            w.append(out)
    work.record_file(path, w.info)


def cache_dtype_of(rows) -> torch.dtype:
    """The torch dtype of a ``TensorRows`` file (safetensors names it F16, BF16 or F32)."""
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[rows.dtype]

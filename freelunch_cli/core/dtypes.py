"""Names of dtypes as options spell them (``bf16``, ``float32``), torch-free so that configs can use them."""

from __future__ import annotations

from freelunch_cli.core.errors import FreelunchError

_CANONICAL = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}  # fmt: skip


def canonical_dtype(name: str) -> str:
    """``float32``, ``bfloat16`` or ``float16`` for any accepted spelling; FreelunchError for anything else (``auto`` is
    resolved by the device policy, ``core.device.resolve_dtype``, before a dtype is recorded)."""
    try:
        return _CANONICAL[name.lower()]
    except (KeyError, AttributeError):
        raise FreelunchError(f"unknown dtype {name!r}: use float32, bfloat16 or float16") from None

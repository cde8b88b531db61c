"""Sizes as people write them: SI units are powers of 1000 and binary units powers of 1024, everywhere.

``2GB`` is 2,000,000,000 bytes (as in ``transformers``' ``max_shard_size``) and ``2GiB`` is 2,147,483,648.
"""

from __future__ import annotations

import re

from freelunch_cli.core.errors import FreelunchError

UNIT_BYTES = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)


def parse_size(text: str | int, option: str) -> int:
    """Bytes of ``40GiB``, ``500MB``, ``2.5GB`` or a plain byte count.

    Raises FreelunchError naming ``option`` (e.g. ``--max-shard-size``) when the text is not a size.
    """
    if isinstance(text, int):
        return text
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise FreelunchError(f"{option} must be a size such as 2GB, 500MB or 40GiB, got {text!r}")
    return int(float(m.group(1)) * UNIT_BYTES[(m.group(2) or "").upper()])


def is_plain_number(text: str) -> bool:
    """True for a number without a unit (``0.8``), which some options read as a fraction."""
    m = _SIZE.fullmatch(str(text))
    return m is not None and not m.group(2)


def format_bytes(n: float) -> str:
    """Binary units, one decimal: ``2.2 GiB``, ``288.0 KiB``, ``1000 B``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")

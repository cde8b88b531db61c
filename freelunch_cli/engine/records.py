"""Which windows of a windowed stage (reconstruct, quantize) are done, read from their records (``windows/NNN.json``,
``quant/records/NNN.json``) and parameter files."""

from __future__ import annotations

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.workdir.files import read_json


def window_done(work, index: int, stage: str = "reconstruct") -> bool:
    """Done when its record says so and its parameter file is recorded: written, or evicted once the assembled blocks
    held it (a damaged one was forgotten, so the window runs again)."""
    p = work.window_record_path(index, stage)
    if not p.exists():
        return False
    try:
        status = read_json(p).get("status")
    except FreelunchError:
        return False
    return status == "done" and work.is_recorded(work.window_params_path(index, stage))


def missing_windows(work, stage: str = "reconstruct") -> str:
    """Indices of windows without a finished record, for error messages ("unknown" before the stage planned them)."""
    total = work.progress(stage).get("windows_total")
    if total is None:
        return "unknown"
    missing = []
    for i in range(total):
        p = work.window_record_path(i, stage)
        if not p.exists() or read_json(p).get("status") != "done":
            missing.append(str(i))
    if len(missing) > 12:
        return ", ".join(missing[:12]) + f", ... ({len(missing)} in all)"
    return ", ".join(missing) or "none"

"""Named points where a test can kill the process, to prove that resuming loses nothing.

``FREELUNCH_KILL_AT=reconstruct.window:2`` sends SIGKILL to this process the 2nd time the point
``reconstruct.window`` is reached (after that unit of work was written); ``...:2:INT`` sends SIGINT
(Ctrl-C) instead, ``...:2:TERM`` SIGTERM (a batch system's time limit), ``...:2:STOP`` SIGSTOP (a suspended
process or a paused VM, continued later by SIGCONT), ``...:2:HANG`` sleeps for ever (a hung worker that lives on), and
``...:2:OOM`` raises ``torch.OutOfMemoryError`` there (a device that ran out of memory; torch is imported only then).
Unset in normal use, when ``kill_point`` costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import time

_reached: dict[str, int] = {}


def kill_point(point: str) -> None:
    """Count a visit to ``point``; kill this process (or raise an out-of-memory error) if ``FREELUNCH_KILL_AT``
    names this visit."""
    spec = os.environ.get("FREELUNCH_KILL_AT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    nth, _, sig = rest.partition(":")
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(nth or 1):
        if sig == "OOM":
            import torch

            raise torch.OutOfMemoryError(f"out of memory (simulated by FREELUNCH_KILL_AT={spec})")
        if sig == "HANG":
            while True:
                time.sleep(3600)
        os.kill(os.getpid(), {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "STOP": signal.SIGSTOP}.get(sig, signal.SIGKILL))

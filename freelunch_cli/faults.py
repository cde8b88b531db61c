"""A test hook that kills the process at a named point, to prove that resuming loses nothing.

``FREELUNCH_KILL_AT=reconstruct.window:2`` sends SIGKILL to this process the 2nd time the point
``reconstruct.window`` is reached (after that unit of work was written); ``...:2:INT`` sends SIGINT
(Ctrl-C) instead, ``...:2:TERM`` SIGTERM (a batch system's time limit). Unset in normal use.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def checkpoint(point: str) -> None:
    spec = os.environ.get("FREELUNCH_KILL_AT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    nth, _, sig = rest.partition(":")
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth or 1):
        os.kill(os.getpid(), {"INT": signal.SIGINT, "TERM": signal.SIGTERM}.get(sig, signal.SIGKILL))

"""Sharing units of work (prune's blocks, windows) between processes: shard assignment, atomic claims, takeover.

A unit is claimed by creating ``NNN.claim.K`` exclusively (K = attempt). Its owner touches the file whenever it makes
progress (a training step, a matrix pruned, a file written): a heartbeat from progress, so that a worker that hangs
while alive loses its claim as surely as a dead one. A claim not touched for ``stale_after`` seconds is taken over by
creating attempt K+1, which only one process can do. Ages are measured on the file server's clock on both sides (the
claim's modification time against that of a probe file this worker touches), never this machine's clock against the
server's. Before every shared write (records, parameter files, deleting assembled blocks) the owner asks
``Claim.holds()``; a worker that lost its claim (suspended, paused, hung, then woken) writes nothing and moves on. A
worker that cannot run a unit (out of memory) releases its claim by dating it back, so another takes it over at once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from freelunch_cli.core.errors import FreelunchError


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str  # "--shard", "torchrun" or "slurm"

    def owns(self, window_index: int) -> bool:
        return window_index % self.count == self.index


def detect_shard(flag: str | None, env: dict | None = None) -> Shard | None:
    """``--shard I/N``, else torchrun's RANK/WORLD_SIZE, else a Slurm array's task id and count; None for one process
    (``--shard 0/1`` says so whatever the environment: a Slurm array whose tasks each run a work directory of their
    own)."""
    env = os.environ if env is None else env
    if flag:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", flag)
        if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
            raise FreelunchError(f"--shard must be I/N with 0 <= I < N, got {flag!r}")
        return Shard(int(m.group(1)), int(m.group(2)), "--shard") if int(m.group(2)) > 1 else None
    if int(env.get("WORLD_SIZE", "1")) > 1 and "RANK" in env:
        return Shard(int(env["RANK"]), int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_ARRAY_TASK_ID" in env and int(env.get("SLURM_ARRAY_TASK_COUNT", "1")) > 1:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return Shard(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]), "slurm")
    return None


def own_first(indices: list[int], shard: Shard | None) -> list[int]:
    """``indices`` with this worker's share first (``shard.owns``), then the rest, which it helps with once its own
    are done (dead or slow workers'); all of them, in order, for a single process."""
    mine = [i for i in indices if shard is None or shard.owns(i)]
    return mine + [i for i in indices if i not in mine]


def claim_in_turn(indices: list[int], done, claims: Claims, poll: float, skip=None, between=None):
    """Yield ``(index, attempt)`` for each unit (block, window) this worker claims, going through ``indices`` in turn
    (``own_first``) and again, taking over the claims of dead workers, until ``done(index)`` holds for all. After a
    pass that claimed nothing (live workers hold the rest) it waits ``poll`` seconds. ``skip(index)``: units this
    worker must not claim (released after running out of memory); ``between()``: called after every pass that
    left work unfinished (it may raise). The caller runs each yielded unit as ``claims.held(index, attempt)``."""
    while True:
        progressed = False
        for i in indices:
            if done(i) or (skip is not None and skip(i)):
                continue
            attempt = claims.try_claim(i)
            if attempt is None:
                continue
            progressed = True
            yield i, attempt
        if all(done(i) for i in indices):
            return
        if between is not None:
            between()
        if not progressed:
            time.sleep(poll)


def wait_seconds(stale_after: float) -> float:
    """How long a worker waits between passes when live workers hold every unfinished unit."""
    return max(0.2, min(5.0, stale_after / 4))


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Claims:
    """Claim files of one stage's units (windows, or prune's blocks) in ``folder``."""

    CLOCK_REFRESH = 5.0  # seconds between reads of the file server's clock; in between, elapsed monotonic time is added

    def __init__(self, folder: Path, stale_after: float):
        self.folder = Path(folder)
        self.stale_after = stale_after
        self.me = worker_id()
        self._clock: tuple[float, float] | None = None  # (server time, monotonic time) at the last probe

    def _attempts(self, index: int) -> list[int]:
        pat = re.compile(rf"{index:03d}\.claim\.(\d+)$")
        return sorted(int(m.group(1)) for p in self.folder.glob(f"{index:03d}.claim.*") if (m := pat.match(p.name)))

    def path(self, index: int, attempt: int) -> Path:
        return self.folder / f"{index:03d}.claim.{attempt}"

    def server_now(self) -> float:
        """Now, on the clock of the file server that stamps the claims: the modification time of a probe file this
        worker touches, plus the monotonic time elapsed since (two machines' clocks are never compared)."""
        mono = time.monotonic()
        if self._clock is None or mono - self._clock[1] > self.CLOCK_REFRESH:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".clock.{re.sub(r'[^A-Za-z0-9_.-]', '_', self.me)}"
            with open(probe, "w") as f:
                f.write(self.me)
            self._clock = (probe.stat().st_mtime, mono)
            try:
                probe.unlink()
            except FileNotFoundError:
                pass
        return self._clock[0] + (mono - self._clock[1])

    def current(self, index: int) -> tuple[int, dict, float] | None:
        """(attempt, owner record, seconds since its owner last made progress) of the latest claim, or None."""
        att = self._attempts(index)
        if not att:
            return None
        p = self.path(index, att[-1])
        try:
            age = self.server_now() - p.stat().st_mtime
            owner = json.loads(p.read_text() or "{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return att[-1], {}, 0.0
        return att[-1], owner, age

    def is_live(self, index: int) -> bool:
        cur = self.current(index)
        return cur is not None and cur[2] < self.stale_after

    def try_claim(self, index: int) -> int | None:
        """The attempt number if this process now owns the unit, else None (someone live owns it)."""
        cur = self.current(index)
        if cur is not None and cur[2] < self.stale_after:
            return None
        attempt = 1 if cur is None else cur[0] + 1
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path(index, attempt), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            json.dump({"worker": self.me, "started": time.time(), "takes_over": cur[1].get("worker") if cur else None}, f)
        return attempt

    def release(self, index: int, attempt: int) -> None:
        """Give a claim up at once (this worker cannot run the unit): it looks stale from now on, so another worker
        takes it over with attempt K+1 without waiting ``stale_after`` seconds."""
        try:
            os.utime(self.path(index, attempt), (0, 0))
        except FileNotFoundError:
            pass

    def taken_over(self, index: int, attempt: int) -> bool:
        """Whether a live worker holds a later attempt than ``attempt`` of the unit."""
        cur = self.current(index)
        return cur is not None and cur[0] > attempt and cur[2] < self.stale_after

    def still_mine(self, index: int, attempt: int) -> bool:
        """Whether ``attempt`` is still the latest claim of the unit (no other worker took it over)."""
        att = self._attempts(index)
        return bool(att) and att[-1] == attempt

    def held(self, index: int, attempt: int) -> Claim:
        """The claim this worker just made, as a ``Claim`` (its first heartbeat given)."""
        claim = Claim(self, index, attempt)
        claim.progress(force=True)
        return claim


class Claim:
    """One claim this worker holds: ``holds()`` before every shared write, ``progress()`` as work advances (the
    heartbeat; at most one touch per ``period`` seconds, so calling it every step costs nothing)."""

    def __init__(self, claims: Claims, index: int, attempt: int):
        self.claims, self.index, self.attempt = claims, index, attempt
        self.period = max(0.05, min(10.0, claims.stale_after / 4))
        self._last = float("-inf")

    def holds(self) -> bool:
        """Whether this worker still owns the unit (no later attempt exists): False once it was taken over."""
        return self.claims.still_mine(self.index, self.attempt)

    def progress(self, force: bool = False) -> None:
        """Record progress: touch the claim (the server stamps it), unless it was touched less than ``period`` ago."""
        now = time.monotonic()
        if not force and now - self._last < self.period:
            return
        self._last = now
        try:
            os.utime(self.claims.path(self.index, self.attempt))
        except FileNotFoundError:
            pass

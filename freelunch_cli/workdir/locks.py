"""File locks: one process per stage and work directory, cooperating sharded workers, and the manifest lock."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from freelunch_cli.core.errors import FreelunchError


class Busy(Exception):
    """A non-blocking lock is held by another process; the message names it (``pid N on HOST``) when known."""


@contextmanager
def locked_file(path: Path, blocking: bool, shared: bool = False):
    """An flock on ``path``. An exclusive lock removes its file on release, so a quiescent work directory
    holds no lock files (``cp -al`` snapshots stay independent); shared locks leave it.

    After locking, the path must still name the locked inode (another process may have released and
    removed it meanwhile); otherwise try again on the new file. Raises Busy when ``blocking`` is False and
    another process holds the lock.
    """
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, mode | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip()
            f.close()
            raise Busy(owner) from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        yield f
    finally:
        if not shared:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


@contextmanager
def stage_lock(work, name: str, shared: bool = False):
    """One process per stage and work directory (a second one is refused with a clear message), or, with
    ``shared``, any number of cooperating workers (``reconstruct --shard``) but no exclusive process."""
    work.root.mkdir(parents=True, exist_ok=True)
    try:
        with locked_file(work.lock_path(name), blocking=False, shared=shared) as f:
            if not shared:
                f.seek(0)
                f.truncate()
                f.write(f"pid {os.getpid()} on {os.uname().nodename}")
                f.flush()
            yield
    except Busy as busy:
        owner = str(busy) or ("sharded workers" if not shared else "another process")
        if shared:
            raise FreelunchError(
                f"{name} is running on {work.root} without --shard ({owner}); wait for it or stop it first"
            ) from None
        raise FreelunchError(f"{name} is already running on {work.root} ({owner}); wait for it or stop it first") from None

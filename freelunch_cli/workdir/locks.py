"""File locks: one process per stage and work directory, cooperating sharded workers, and the manifest lock.

They are ``flock`` locks, which a shared filesystem honours across nodes only when it is mounted so (Lustre with
``-o flock``; NFS gives them through its lock manager, not with ``-o nolock`` or ``local_lock=flock``). Before a
stage takes its lock, ``check_locks`` makes sure locks work on the work directory's filesystem at all."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from freelunch_cli.core.errors import FreelunchError

_CHECKED: set[str] = set()  # folders whose locks this process found working
LOCK_HELP = (
    "mount the filesystem with working file locks (Lustre: -o flock, not localflock; NFS: without -o nolock or "
    "local_lock=flock) or use a work directory on a filesystem that has them (docs/scale-out.md)"
)


def check_locks(folder: Path) -> None:
    """Make sure ``flock`` works in ``folder``: an exclusive lock taken through one descriptor must refuse a second
    descriptor of the same file in the same process. FreelunchError naming the folder and the mount option otherwise
    (without working locks two processes could run one stage, or write one manifest, at once)."""
    key = str(Path(folder).resolve())
    if key in _CHECKED:
        return
    probe = Path(folder) / f".lock-check.{os.getpid()}"
    try:
        with open(probe, "a+") as first, open(probe, "a+") as second:
            try:
                fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                raise FreelunchError(f"file locks do not work in {folder} ({e.strerror or e}); {LOCK_HELP}") from None
            try:
                fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # refused, as it must be
            except OSError as e:
                raise FreelunchError(f"file locks do not work in {folder} ({e.strerror or e}); {LOCK_HELP}") from None
            else:
                raise FreelunchError(
                    f"file locks do not work in {folder}: a second lock on a locked file was granted; {LOCK_HELP}"
                )
            finally:
                fcntl.flock(first, fcntl.LOCK_UN)
    finally:
        probe.unlink(missing_ok=True)
    _CHECKED.add(key)


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
    check_locks(work.root)
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

"""``manifest.json``: each stage's record (signature, status, summary) and each file's (size, sha256, modification
time, and whether it was evicted: deleted on purpose once nothing needed it, which is not damage).

Every change is a read-modify-write under an exclusive lock (``update``), so that any number of workers share it."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from freelunch_cli import __version__
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.workdir.files import FileInfo, read_json, write_json_atomic
from freelunch_cli.workdir.layout import STAGE_OUTPUTS
from freelunch_cli.workdir.locks import locked_file

VERIFIED: set[tuple] = set()  # files whose hash this process checked or wrote: (path, size, mtime, hash)


@dataclass
class StageRecord:
    """What the manifest says about one stage."""

    name: str
    status: str  # "running" | "done"
    signature: dict
    run_id: str
    summary: dict


class Manifest:
    """Stage and file records of a work directory (a mixin of ``WorkDir``)."""

    root: Path
    _lock_depth: int = 0

    # ---- keys ----------------------------------------------------------------------------------------------
    def path_of(self, rel: str) -> Path:
        """The file a manifest key names (``acts/...`` keys live in the cache folder)."""
        return self.acts_dir / rel[5:] if rel.startswith("acts/") else self.root / rel

    def rel(self, path: Path) -> str:
        """The manifest key of a file: its path in the work directory (activations under ``acts/``)."""
        path = Path(path)
        acts = self.acts_dir_here()  # no cache on this node: no file can lie in it
        if acts is not None and acts != self.root / "acts" and path.is_relative_to(acts):
            return "acts/" + str(path.relative_to(acts))
        return str(path.relative_to(self.root))

    @staticmethod
    def owner_stage_of(rel: str) -> str:
        """The stage whose output folder holds ``rel`` (the longest matching folder wins: acts/pruned is prune's)."""
        matches = [(len(o), st) for st, outs in STAGE_OUTPUTS.items() for o in outs if rel == o or rel.startswith(o + "/")]
        return max(matches)[1] if matches else "calibrate"

    # ---- reading and writing -------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"format": 1, "tool": f"freelunch {__version__}", "stages": {}, "files": {}}
        m = read_json(self.manifest_path)
        if not isinstance(m, dict) or "stages" not in m:
            raise FreelunchError(f"{self.manifest_path} is not a freelunch manifest")
        return m

    @contextmanager
    def manifest_lock(self):
        """Exclusive across processes; re-entrant within one (a stage's begin clears outputs under the same lock)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with locked_file(self.lock_path("manifest"), blocking=True):
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    @contextmanager
    def update(self):
        """Read-modify-write the manifest under an exclusive lock (several workers may share it)."""
        with self.manifest_lock():
            m = self.manifest()
            yield m
            write_json_atomic(self.manifest_path, m)

    # ---- file records ----------------------------------------------------------------------------------------
    def record_file(self, path: Path, info: FileInfo) -> None:
        """Record a file this process wrote: size, sha256 (computed while writing) and modification time. The file is
        known good to this process from now on, so reading it back costs no hashing."""
        st = Path(path).stat()
        with self.update() as m:
            m["files"][self.rel(path)] = {**info.as_dict(), "mtime_ns": st.st_mtime_ns}
        VERIFIED.add((str(Path(path).resolve()), st.st_size, st.st_mtime_ns, info.sha256))

    def is_recorded(self, path: Path) -> bool:
        """Whether a stage recorded this file as written (it may since have been evicted, deleted or damaged)."""
        return self.rel(path) in self.manifest()["files"]

    def is_evicted(self, path: Path) -> bool:
        """Whether the file was deleted on purpose (``evict``) and not written since."""
        return bool(self.manifest()["files"].get(self.rel(path), {}).get("evicted"))

    def evict(self, paths: list[Path]) -> None:
        """Delete files that nothing needs any more, keeping their records marked evicted: the stage that owns them
        stays complete (a rerun with the same options finds it done), and a stage that needs one recomputes it."""
        with self.update() as m:
            for p in paths:
                rec = m["files"].get(self.rel(p))
                if rec is not None:
                    rec["evicted"] = True
        for p in paths:
            Path(p).unlink(missing_ok=True)

    def forget_file(self, path: Path) -> None:
        """Delete a file that nothing needs any more, and its manifest record."""
        self.forget([self.rel(path)])

    def forget(self, rels: list[str]) -> None:
        """Delete files by manifest key, and their records (a damaged file's owner then recomputes it)."""
        with self.update() as m:
            for rel in rels:
                m["files"].pop(rel, None)
        for rel in rels:
            self.path_of(rel).unlink(missing_ok=True)

    # ---- stage records ---------------------------------------------------------------------------------------
    def stage(self, name: str) -> StageRecord | None:
        s = self.manifest()["stages"].get(name)
        if s is None:
            return None
        return StageRecord(name, s["status"], s["signature"], s["run_id"], s.get("summary", {}))

    def require_done(self, name: str, for_what: str) -> StageRecord:
        s = self.stage(name)
        if s is None or s.status != "done":
            where = "has not run" if s is None else "did not finish"
            hint = f"run `freelunch {name} --work {self.root}`" + (" --resume" if s is not None else "")
            raise FreelunchError(f"{for_what} needs a finished `{name}` stage, but {name} {where} in {self.root}; {hint}")
        return s

    def set_progress(self, name: str, key: str, value) -> None:
        with self.update() as m:
            m["stages"][name].setdefault("progress", {})[key] = value

    def progress(self, name: str) -> dict:
        return self.manifest()["stages"].get(name, {}).get("progress", {})

"""The work directory: the interface between stages.

It holds ``manifest.json`` (run signature, per-stage config and status, sizes and hashes of the files
the stages wrote) plus each stage's outputs. A stage never needs the process that wrote its input: it
can run on another node, days later, after a crash.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from freelunch_cli import __version__
from freelunch_cli.errors import FreelunchError
from freelunch_cli.storage import FileInfo, read_json, sha256_file, write_json_atomic

_VERIFIED: set[tuple] = set()  # files whose hash was checked by this process (path, size, mtime, hash)

STAGES = ("calibrate", "prune", "reconstruct", "retrain")
# What each stage writes, relative to the work directory; cleared when the stage starts over.
STAGE_OUTPUTS = {
    "calibrate": ["calib", "acts", "dense"],
    "prune": ["prune", "pruned", "acts/pruned"],
    "reconstruct": ["windows", "recon", "acts/recon"],
    "retrain": ["retrain"],
}
MODEL_STAGES = ("dense", "pruned", "reconstructed", "retrained")
# The stage that produces each model.
STAGE_OF = {"dense": "calibrate", "pruned": "prune", "reconstructed": "reconstruct", "retrained": "retrain"}


@dataclass
class StageState:
    """What the manifest says about one stage."""

    name: str
    status: str  # "running" | "done"
    signature: dict
    run_id: str
    summary: dict


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


class WorkDir:
    """Paths and manifest of one work directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.damaged: list[str] = []  # files found damaged when the current stage began
        self._lock_depth = 0

    # ---- paths -------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def model_dir(self, stage: str) -> Path:
        return self.root / {"dense": "dense", "pruned": "pruned", "reconstructed": "recon", "retrained": "retrain"}[stage]

    def rest_path(self, stage: str) -> Path:
        """Embeddings, final norm and head of a model stage (only global retraining changes them)."""
        p = self.model_dir("retrained") / "rest.safetensors"
        return p if stage == "retrained" and p.exists() else self.model_dir("dense") / "rest.safetensors"

    def block_path(self, stage: str, i: int) -> Path:
        return self.model_dir(stage) / f"block_{i:03d}.safetensors"

    def mask_path(self, i: int) -> Path:
        return self.root / "prune" / "masks" / f"block_{i:03d}.safetensors"

    @property
    def acts_dir(self) -> Path:
        """Where activation caches live: ``WORK/acts``, or the ``--cache-dir`` calibrate was given."""
        if not hasattr(self, "_acts_dir"):
            cache = self.manifest().get("cache_dir") if self.exists() else None
            self._acts_dir = Path(cache) if cache else self.root / "acts"
        return self._acts_dir

    def act_path(self, stream: str, name: str) -> Path:
        return self.acts_dir / stream / f"{name}.safetensors"

    def boundary_path(self, stream: str, i: int) -> Path:
        return self.act_path(stream, f"boundary_{i:03d}")

    def set_cache_dir(self, folder: Path | None) -> None:
        """Keep activations in a folder of their own under ``folder`` (e.g. node-local scratch)."""
        with self.update() as m:
            current = m.get("cache_dir")
            if folder is None:
                m["cache_dir"] = None
            elif not (current and Path(current).parent == Path(folder).resolve()):
                m["cache_dir"] = str(Path(folder).resolve() / f"freelunch-{self.root.resolve().name}-{uuid.uuid4().hex[:8]}")
        self.__dict__.pop("_acts_dir", None)

    def path_of(self, rel: str) -> Path:
        """The file a manifest key names (``acts/...`` keys live in the cache folder)."""
        return self.acts_dir / rel[5:] if rel.startswith("acts/") else self.root / rel

    @property
    def tokens_path(self) -> Path:
        return self.root / "calib" / "tokens.safetensors"

    def window_record_path(self, index: int) -> Path:
        return self.root / "windows" / f"{index:03d}.json"

    def rel(self, path: Path) -> str:
        """The manifest key of a file: its path in the work directory (activations under ``acts/``)."""
        path = Path(path)
        if self.acts_dir != self.root / "acts" and path.is_relative_to(self.acts_dir):
            return "acts/" + str(path.relative_to(self.acts_dir))
        return str(path.relative_to(self.root))

    # ---- manifest ----------------------------------------------------------------------------------
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
    def _manifest_lock(self):
        """Exclusive across processes; re-entrant within one (begin() clears under the same lock)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with locked_file(self.root / ".manifest.lock", blocking=True):
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    @contextmanager
    def update(self):
        """Read-modify-write the manifest under an exclusive lock (several workers may share it)."""
        with self._manifest_lock():
            m = self.manifest()
            yield m
            write_json_atomic(self.manifest_path, m)

    def record_file(self, path: Path, info: FileInfo) -> None:
        with self.update() as m:
            m["files"][self.rel(path)] = info.as_dict()

    def forget_file(self, path: Path) -> None:
        """Delete a file that nothing needs any more, and its manifest record."""
        with self.update() as m:
            m["files"].pop(self.rel(path), None)
        Path(path).unlink(missing_ok=True)

    def owner_stage(self, path: Path) -> str:
        return self.owner_stage_of(self.rel(path))

    @staticmethod
    def owner_stage_of(rel: str) -> str:
        """The stage whose output folder holds ``rel`` (the longest matching folder wins: acts/pruned is prune's)."""
        matches = [(len(o), st) for st, outs in STAGE_OUTPUTS.items() for o in outs if rel == o or rel.startswith(o + "/")]
        return max(matches)[1] if matches else "calibrate"

    def problem(self, path: Path, record: dict | None = None) -> str | None:
        """What is wrong with a file the manifest recorded (missing, truncated, altered), or None.

        Sizes are always checked; contents are hashed once per process and file unless
        ``FREELUNCH_VERIFY=size`` (for very large runs where hashing costs minutes).
        """
        path = Path(path)
        rec = record if record is not None else self.manifest()["files"].get(self.rel(path))
        if not path.exists():
            return "missing"
        st = path.stat()
        if rec is None:
            return None
        if st.st_size != rec["size"]:
            return f"{st.st_size} bytes where {rec['size']} were written: truncated or altered"
        if os.environ.get("FREELUNCH_VERIFY", "full") == "size":
            return None
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, rec["sha256"])
        if key not in _VERIFIED:
            if sha256_file(path).sha256 != rec["sha256"]:
                return "its contents do not match the hash recorded when it was written: altered or corrupt"
            _VERIFIED.add(key)
        return None

    def check_file(self, path: Path) -> Path:
        """The path, once checked against its manifest record; a clear error naming it otherwise."""
        path = Path(path)
        trouble = self.problem(path)
        if trouble is not None:
            stage = self.owner_stage(path)
            raise FreelunchError(
                f"{path} is {trouble if trouble == 'missing' else 'damaged (' + trouble + ')'}; "
                f"rerun `freelunch {stage} --work {self.root} --resume` to recompute it"
            )
        return path

    def scan_stage(self, name: str) -> list[str]:
        """Names of the files a stage recorded that are now missing or damaged."""
        files = self.manifest()["files"]
        return [rel for rel, rec in files.items() if self.owner_stage_of(rel) == name and self.problem(self.path_of(rel), rec)]

    def forget(self, rels: list[str]) -> None:
        """Drop damaged files and their records, so the stage that owns them recomputes them."""
        with self.update() as m:
            for rel in rels:
                m["files"].pop(rel, None)
        for rel in rels:
            self.path_of(rel).unlink(missing_ok=True)

    # ---- stages ------------------------------------------------------------------------------------
    def stage(self, name: str) -> StageState | None:
        s = self.manifest()["stages"].get(name)
        if s is None:
            return None
        return StageState(name, s["status"], s["signature"], s["run_id"], s.get("summary", {}))

    def lineage(self, stage: str) -> dict[str, StageState]:
        """The stages whose work the model of ``stage`` holds (prune, reconstruct, retrain; the dense model: none).

        Retraining holds what it started from: `--from dense` neither pruning nor reconstruction, `--from pruned`
        not a reconstruction that may also exist in the directory. Model cards and run descriptions read this.
        """
        steps = {"dense": [], "pruned": ["prune"], "reconstructed": ["prune", "reconstruct"], "retrained": []}[stage]
        if stage == "retrained":
            ret = self.stage("retrain")
            start = ret.summary.get("from") if ret is not None else None
            steps = {"pruned": ["prune"], "reconstructed": ["prune", "reconstruct"]}.get(start, []) + ["retrain"]
        return {name: st for name in steps if (st := self.stage(name)) is not None}

    def require_done(self, name: str, for_what: str) -> StageState:
        s = self.stage(name)
        if s is None or s.status != "done":
            where = "has not run" if s is None else "did not finish"
            hint = f"run `freelunch {name} --work {self.root}`" + (" --resume" if s is not None else "")
            raise FreelunchError(f"{for_what} needs a finished `{name}` stage, but {name} {where} in {self.root}; {hint}")
        return s

    def check_signature(self, name: str, signature: dict, force: bool) -> StageState | None:
        """Refuse to mix runs: a stage recorded with another signature needs ``force``."""
        old = self.stage(name) if self.exists() else None
        # Keys missing on either side count as None: options added later keep older work directories valid.
        diff = "; ".join(_differences(old.signature, signature)) if old is not None and not force else ""
        if diff:
            what = "another run" if name == "calibrate" else f"another {name} configuration"
            raise FreelunchError(
                f"{self.root} holds {what} ({diff}); use a new --work, or --force to redo {name}"
                + ("" if name == "calibrate" else " (later stages are discarded)")
            )
        return old

    def begin(self, name: str, signature: dict, resume: bool, force: bool) -> str:
        """Start or continue a stage. Returns "fresh", "resume" or "done".

        Refuses a different signature (another model, data, seed or config) unless ``force``, and a
        half-finished stage unless ``resume`` or ``force``. Starting a stage over clears its outputs and
        those of every later stage; earlier stages are kept. Atomic: concurrent workers starting the
        same stage create it once.
        """
        with self._manifest_lock():
            return self._begin(name, signature, resume, force)

    def _begin(self, name: str, signature: dict, resume: bool, force: bool) -> str:
        old = self.check_signature(name, signature, force)
        if old is not None and not force:
            bad = self.scan_stage(name)
            if bad:
                names = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
                if not resume:
                    raise FreelunchError(f"{len(bad)} file(s) of {name} in {self.root} are missing or damaged ({names}); "
                                         f"rerun with --resume to recompute them")
                self.forget(bad)
                with self.update() as m:
                    m["stages"][name]["status"] = "running"
                self.damaged = bad
                return "resume"
            if old.status == "done":
                return "done"
            if not resume:
                raise FreelunchError(
                    f"{name} was interrupted in {self.root}; rerun with --resume to continue, or --force to start it over"
                )
            return "resume"
        later = STAGES[STAGES.index(name):] if name in STAGES else (name,)
        self.clear(later)
        with self.update() as m:
            m["stages"][name] = {
                "status": "running",
                "signature": signature,
                "run_id": uuid.uuid4().hex[:12],
                "started": time.time(),
                "summary": {},
            }
        return "fresh"

    def report_done(self, name: str, rep) -> dict:
        """A finished stage asked to run again with the same options: its summary, nothing redone."""
        summary = self.stage(name).summary
        rep.summary(f"{name} already done in {self.root}", summary)
        return summary

    def finish(self, name: str, summary: dict) -> None:
        with self.update() as m:
            s = m["stages"][name]
            s["status"] = "done"
            s["finished"] = time.time()
            s["summary"] = summary

    def set_progress(self, name: str, key: str, value) -> None:
        with self.update() as m:
            m["stages"][name].setdefault("progress", {})[key] = value

    def progress(self, name: str) -> dict:
        return self.manifest()["stages"].get(name, {}).get("progress", {})

    def clear(self, stages) -> None:
        """Delete the outputs and manifest entries of these stages."""
        with self.update() as m:
            for st in stages:
                m["stages"].pop(st, None)
                for out in STAGE_OUTPUTS.get(st, []):
                    p = self.path_of(out) if out.startswith("acts/") else (self.acts_dir if out == "acts" else self.root / out)
                    prefix = out + "/"
                    for k in [k for k in m["files"] if k.startswith(prefix)]:
                        del m["files"][k]
                    if p.is_dir():
                        shutil.rmtree(p)

    # ---- which model is current ----------------------------------------------------------------------
    def latest_model_stage(self) -> str:
        """The most processed model the directory holds: retrained > reconstructed > pruned > dense."""
        self.require_done("calibrate", "this command")
        ret = self.stage("retrain")
        if ret is not None:
            if ret.status != "done":
                raise FreelunchError(f"retrain did not finish in {self.root}; rerun `freelunch retrain --work {self.root} --resume`, "
                                     f"or pass --stage")
            return "retrained"
        rec, pr = self.stage("reconstruct"), self.stage("prune")
        if rec is not None:
            if rec.status != "done":
                raise FreelunchError(
                    f"reconstruct did not finish in {self.root} (missing windows: {rec_missing(self)}); "
                    f"rerun `freelunch reconstruct --work {self.root} --resume`, or pass --stage pruned"
                )
            return "reconstructed"
        if pr is not None:
            if pr.status != "done":
                raise FreelunchError(f"prune did not finish in {self.root}; rerun `freelunch prune --work {self.root} --resume`")
            return "pruned"
        return "dense"

    def require_model(self, stage: str) -> str:
        """Check that the model of ``stage`` (or of the latest stage) exists and is complete; return the stage."""
        if stage == "latest":
            return self.latest_model_stage()
        if stage not in MODEL_STAGES:
            raise FreelunchError(f"--stage must be latest or one of {', '.join(MODEL_STAGES)}")
        self.require_done("calibrate", "this command")
        st = self.stage(STAGE_OF[stage])
        if stage == "reconstructed" and st is not None and st.status != "done":
            raise FreelunchError(f"reconstruct did not finish in {self.root} (missing windows: {rec_missing(self)}); "
                                 f"rerun `freelunch reconstruct --work {self.root} --resume`, or pass --stage pruned")
        if st is None or st.status != "done":
            raise FreelunchError(f"no finished {stage} model in {self.root}")
        return stage

    def stage_block_path(self, stage: str, i: int) -> Path:
        """The shard of block ``i`` for a model stage (blocks a stage did not change come from the stage before)."""
        order = MODEL_STAGES[: MODEL_STAGES.index(stage) + 1]
        for st in reversed(order):
            p = self.block_path(st, i)
            if p.exists():
                return self.check_file(p)
        raise FreelunchError(f"block {i} is missing from {self.root}; rerun calibrate")


def rec_missing(work: WorkDir) -> str:
    """Names of windows without a finished record, for error messages."""
    total = work.progress("reconstruct").get("windows_total")
    if total is None:
        return "unknown"
    missing = []
    for i in range(total):
        p = work.window_record_path(i)
        if not p.exists() or read_json(p).get("status") != "done":
            missing.append(str(i))
    if len(missing) > 12:
        return ", ".join(missing[:12]) + f", ... ({len(missing)} in all)"
    return ", ".join(missing) or "none"


@contextmanager
def locked_file(path: Path, blocking: bool, shared: bool = False):
    """An flock on ``path``. An exclusive lock removes its file on release, so a quiescent work directory
    holds no lock files (``cp -al`` snapshots stay independent); shared locks leave it.

    After locking, the path must still name the locked inode (another process may have released and
    removed it meanwhile); otherwise try again on the new file.
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


class Busy(Exception):
    pass


@contextmanager
def stage_lock(work: WorkDir, name: str, shared: bool = False):
    """One process per stage and work directory (a second one is refused with a clear message), or, with
    ``shared``, any number of cooperating workers (``reconstruct --shard``) but no exclusive process."""
    work.root.mkdir(parents=True, exist_ok=True)
    try:
        with locked_file(work.root / f".{name}.lock", blocking=False, shared=shared) as f:
            if not shared:
                f.seek(0)
                f.truncate()
                f.write(f"pid {os.getpid()} on {os.uname().nodename}")
                f.flush()
            yield
    except Busy as busy:
        owner = str(busy) or ("sharded workers" if not shared else "another process")
        if shared:
            raise FreelunchError(f"{name} is running on {work.root} without --shard ({owner}); wait for it or stop it first") from None
        raise FreelunchError(f"{name} is already running on {work.root} ({owner}); wait for it or stop it first") from None

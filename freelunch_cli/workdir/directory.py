"""The work directory's layout and manifest: where every file lives, which files were written, and what each stage
recorded.

``manifest.json`` holds the run's stages (signature, status, summary) and the size and sha256 of every file a stage
wrote. Every path a stage reads or writes is built here, so the layout is written down in one place
(``docs/workdir.md`` describes it for users).
"""

from __future__ import annotations

import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from freelunch_cli import __version__
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.workdir.files import FileInfo, read_json, sha256_file, write_json_atomic
from freelunch_cli.workdir.locks import locked_file

_VERIFIED: set[tuple] = set()  # files whose hash this process checked: (path, size, mtime, hash)

STAGES = ("calibrate", "prune", "reconstruct", "retrain", "quantize")
# What each stage writes, relative to the work directory; cleared when the stage starts over.
STAGE_OUTPUTS = {
    "calibrate": ["calib", "acts", "dense"],
    "prune": ["prune", "pruned", "acts/pruned"],
    "reconstruct": ["windows", "recon", "acts/recon"],
    "retrain": ["retrain"],
    "quantize": ["quant", "acts/quant"],
}
MODEL_STAGES = ("dense", "pruned", "reconstructed", "retrained", "quantized")
STAGE_OF = {
    "dense": "calibrate",
    "pruned": "prune",
    "reconstructed": "reconstruct",
    "retrained": "retrain",
    "quantized": "quantize",
}  # who makes each model
_MODEL_FOLDERS = {"dense": "dense", "pruned": "pruned", "reconstructed": "recon", "retrained": "retrain", "quantized": "quant"}
WINDOW_STAGES = {"reconstruct": "reconstructed", "quantize": "quantized"}  # stages that run windows, and their model


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def is_template(folder: str) -> bool:
    """Whether a folder names environment variables (``$SLURM_JOB_ID``, ``${TMPDIR}``) to expand in each process."""
    return bool(_VARIABLE.search(folder))


def expand_cache_dir(folder: str) -> Path:
    """A cache folder with its environment variables (and ``~``) expanded; FreelunchError naming one that is unset."""
    unset = [a or b for a, b in _VARIABLE.findall(folder) if (a or b) not in os.environ]
    if unset:
        raise FreelunchError(
            f"the activation cache folder {folder} names ${unset[0]}, which is not set in this process; set it (e.g. "
            f"to node-local scratch) or run calibrate with another --cache-dir"
        )
    return Path(os.path.expanduser(os.path.expandvars(folder)))


@dataclass
class StageRecord:
    """What the manifest says about one stage."""

    name: str
    status: str  # "running" | "done"
    signature: dict
    run_id: str
    summary: dict


class WorkDir:
    """Paths and manifest of one work directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock_depth = 0

    # ---- paths: models ---------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def lock_path(self, name: str) -> Path:
        """The lock file of a stage (``.prune.lock``), of the manifest or of assembly."""
        return self.root / f".{name}.lock"

    def model_dir(self, stage: str) -> Path:
        return self.root / _MODEL_FOLDERS[stage]

    def block_path(self, stage: str, i: int) -> Path:
        return self.model_dir(stage) / f"block_{i:03d}.safetensors"

    def own_rest_path(self, stage: str) -> Path:
        """Where a model stage would keep its own embeddings, final norm and head (only dense and retrained do)."""
        return self.model_dir(stage) / "rest.safetensors"

    def rest_path(self, stage: str) -> Path:
        """Embeddings, final norm and head of a model stage (only global retraining changes them; the quantized model
        keeps those of the model it quantized)."""
        if stage == "quantized":
            stage = self.quantized_from()
        own = self.own_rest_path("retrained")
        return own if stage == "retrained" and own.exists() else self.own_rest_path("dense")

    @property
    def tokens_path(self) -> Path:
        return self.root / "calib" / "tokens.safetensors"

    def input_stats_path(self, i: int) -> Path:
        """Per-input sums of squares of block ``i``'s matrices on the dense calibration stream, gathered by calibrate's
        dense pass (Wanda's and RIA's statistics with ``prune --stats dense``)."""
        return self.root / "calib" / "stats" / f"block_{i:03d}.safetensors"

    # ---- paths: prune ------------------------------------------------------------------------------------
    def mask_path(self, i: int) -> Path:
        return self.root / "prune" / "masks" / f"block_{i:03d}.safetensors"

    def prune_block_record_path(self, i: int) -> Path:
        """Per-block record of what prune did (achieved sparsity of each matrix); written before the block's shard."""
        return self.root / "prune" / "blocks" / f"{i:03d}.json"

    @property
    def prune_report_path(self) -> Path:
        return self.root / "prune" / "report.json"

    @property
    def prune_claims_dir(self) -> Path:
        """Claim files of sharded prune workers (``NNN.claim.K`` per block, as reconstruct's windows)."""
        return self.root / "prune" / "claims"

    # ---- paths: reconstruct, quantize and retrain ------------------------------------------------------
    def windows_dir(self, stage: str = "reconstruct") -> Path:
        """Window records and sharded workers' claims of a windowed stage (reconstruct, quantize)."""
        return self.root / "windows" if stage == "reconstruct" else self.model_dir(WINDOW_STAGES[stage]) / "records"

    def window_record_path(self, index: int, stage: str = "reconstruct") -> Path:
        return self.windows_dir(stage) / f"{index:03d}.json"

    def window_params_path(self, index: int, stage: str = "reconstruct") -> Path:
        """The parameters one window trained (deleted once assembled, unless --keep-cache)."""
        return self.model_dir(WINDOW_STAGES[stage]) / "windows" / f"{index:03d}.safetensors"

    def qparams_path(self, i: int) -> Path:
        """Scales and zero points of block ``i``'s quantized matrices (``name.weight_scale``, ``name.weight_zero_point``)."""
        return self.model_dir("quantized") / "qparams" / f"block_{i:03d}.safetensors"

    def quantized_from(self) -> str:
        """The model the quantize stage started from (dense, pruned, reconstructed or retrained)."""
        st = self.stage("quantize")
        if st is None:
            raise FreelunchError(f"no quantize stage in {self.root}")
        return st.signature["from"]

    @property
    def retrain_checkpoint_path(self) -> Path:
        """Model and optimizer of a single-process retraining, every ``--save-every`` steps."""
        return self.model_dir("retrained") / "checkpoint.pt"

    @property
    def retrain_sharded_checkpoint_dir(self) -> Path:
        """Sharded checkpoints of a retraining under torchrun (``torch.distributed.checkpoint``, one folder per step and
        ``checkpoint.json`` naming the last complete one)."""
        return self.model_dir("retrained") / "checkpoint"

    # ---- paths: evaluation ---------------------------------------------------------------------------------
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_result_path(self, model: str, name: str) -> Path:
        return self.eval_dir / f"{model}__{name}.json"

    def eval_results(self, model: str) -> list[Path]:
        return sorted(self.eval_dir.glob(f"{model}__*.json")) if self.eval_dir.is_dir() else []

    @property
    def report_dir(self) -> Path:
        return self.eval_dir / "report"

    # ---- paths: activation caches ------------------------------------------------------------------------
    @property
    def acts_dir(self) -> Path:
        """Where activation caches live: ``WORK/acts``, or the ``--cache-dir`` calibrate was given. A template with
        environment variables (``$SLURM_JOB_ID``, ``$TMPDIR``) is stored as written and expanded by each process, so every
        node has a cache of its own; FreelunchError naming a variable that is not set."""
        if not hasattr(self, "_acts_dir"):
            cache = self.manifest().get("cache_dir") if self.exists() else None
            self._acts_dir = expand_cache_dir(cache) if cache else self.root / "acts"
        return self._acts_dir

    @property
    def cache_per_node(self) -> bool:
        """Whether the activation cache is a template (``--cache-dir '$TMPDIR/fl'``): one folder per node."""
        return self.exists() and is_template(self.manifest().get("cache_dir") or "")

    def acts_dir_here(self) -> Path | None:
        """``acts_dir``, or None where its template names an environment variable this process lacks (no cache here)."""
        try:
            return self.acts_dir
        except FreelunchError:
            return None

    def act_path(self, stream: str, name: str) -> Path:
        """An activation file of a stream (dense, pruned, recon) by name (``boundary_003``, ``mid_002``)."""
        return self.acts_dir / stream / f"{name}.safetensors"

    def boundary_path(self, stream: str, i: int) -> Path:
        """The hidden state entering block ``i`` (``i`` = number of blocks: the last block's output)."""
        return self.act_path(stream, f"boundary_{i:03d}")

    def set_cache_dir(self, folder: str | Path | None, fresh: bool = False) -> None:
        """Keep activations in a folder of their own under ``folder`` (e.g. node-local scratch); a template with
        environment variables is kept as written (see ``acts_dir``), any other folder as an absolute path. ``fresh``
        (a calibration that starts over) always takes a new folder, so that no node reads another run's copies."""
        with self.update() as m:
            current, base = m.get("cache_dir"), None
            if folder is not None:
                base = str(folder).rstrip("/") if is_template(str(folder)) else str(Path(folder).expanduser().resolve())
            if base is None:
                m["cache_dir"] = None
            elif fresh or not (current and str(Path(current).parent) == str(Path(base))):
                m["cache_dir"] = f"{base}/freelunch-{self.root.resolve().name}-{uuid.uuid4().hex[:8]}"
        self.__dict__.pop("_acts_dir", None)

    # ---- manifest keys -------------------------------------------------------------------------------------
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

    def is_recorded(self, path: Path) -> bool:
        """Whether a stage recorded this file as written (it may since have been deleted or damaged)."""
        return self.rel(path) in self.manifest()["files"]

    # ---- manifest ------------------------------------------------------------------------------------------
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

    def record_file(self, path: Path, info: FileInfo) -> None:
        """Record a file this process wrote: size, sha256 (computed while writing) and modification time. The file is
        known good to this process from now on, so reading it back costs no hashing."""
        st = Path(path).stat()
        with self.update() as m:
            m["files"][self.rel(path)] = {**info.as_dict(), "mtime_ns": st.st_mtime_ns}
        _VERIFIED.add((str(Path(path).resolve()), st.st_size, st.st_mtime_ns, info.sha256))

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

    @staticmethod
    def owner_stage_of(rel: str) -> str:
        """The stage whose output folder holds ``rel`` (the longest matching folder wins: acts/pruned is prune's)."""
        matches = [(len(o), st) for st, outs in STAGE_OUTPUTS.items() for o in outs if rel == o or rel.startswith(o + "/")]
        return max(matches)[1] if matches else "calibrate"

    # ---- file integrity ------------------------------------------------------------------------------------
    def problem(self, path: Path, record: dict | None = None, policy: str | None = None) -> str | None:
        """What is wrong with a file the manifest recorded (missing, truncated, altered), or None.

        The size is always checked. Then, by ``policy`` (default ``FREELUNCH_VERIFY``, else ``mtime``): ``mtime`` trusts
        a file whose modification time is the one recorded when it was written and hashes any other; ``full`` hashes
        every file (once per process); ``size`` hashes none. A file this process wrote or hashed is never hashed again.
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
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, rec["sha256"])
        policy = policy or os.environ.get("FREELUNCH_VERIFY") or self._default_policy(path)
        if key in _VERIFIED or policy == "size" or (policy == "mtime" and rec.get("mtime_ns") == st.st_mtime_ns):
            return None
        if sha256_file(path).sha256 != rec["sha256"]:
            return "its contents do not match the hash recorded when it was written: altered or corrupt"
        _VERIFIED.add(key)
        return None

    def _default_policy(self, path: Path) -> str:
        """``mtime``; ``size`` for activations in a per-node cache, whose record (modification time and hash) is that of
        the node that wrote its copy last: each node computes its own copy, and hashing hundreds of GB on every node
        would cost more than the pass that wrote them."""
        if self.cache_per_node and self.rel(path).startswith("acts/"):
            return "size"
        return "mtime"

    def check_file(self, path: Path) -> Path:
        """The path, once checked against its manifest record; a clear error naming it otherwise."""
        path = Path(path)
        trouble = self.problem(path)
        if trouble is not None:
            stage = self.owner_stage_of(self.rel(path))
            raise FreelunchError(
                f"{path} is {trouble if trouble == 'missing' else 'damaged (' + trouble + ')'}; "
                f"rerun `freelunch {stage} --work {self.root} --resume` to recompute it"
            )
        return path

    def damaged_files(self, stage: str) -> list[str]:
        """Manifest keys of the files a stage recorded that are now missing or damaged."""
        files = self.manifest()["files"]
        return [rel for rel, rec in files.items() if self.owner_stage_of(rel) == stage and self.problem(self.path_of(rel), rec)]

    # ---- stages --------------------------------------------------------------------------------------------
    def stage(self, name: str) -> StageRecord | None:
        s = self.manifest()["stages"].get(name)
        if s is None:
            return None
        return StageRecord(name, s["status"], s["signature"], s["run_id"], s.get("summary", {}))

    def lineage(self, model: str) -> dict[str, StageRecord]:
        """The stages whose work the model of ``model`` holds (prune, reconstruct, retrain; the dense model: none).

        Retraining holds what it started from: `--from dense` neither pruning nor reconstruction, `--from pruned`
        not a reconstruction that may also exist in the directory. Model cards and run descriptions read this.
        """
        if model == "quantized":
            return {**self.lineage(self.quantized_from()), "quantize": self.stage("quantize")}
        steps = {"dense": [], "pruned": ["prune"], "reconstructed": ["prune", "reconstruct"], "retrained": []}[model]
        if model == "retrained":
            ret = self.stage("retrain")
            start = ret.summary.get("from") if ret is not None else None
            steps = {"pruned": ["prune"], "reconstructed": ["prune", "reconstruct"]}.get(start, []) + ["retrain"]
        return {name: st for name in steps if (st := self.stage(name)) is not None}

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

    def stage_block_path(self, model: str, i: int) -> Path:
        """The checked shard of block ``i`` of a model (blocks a stage did not change come from the model before)."""
        if model == "quantized":  # every block is written; no fallback to another model
            return self.check_file(self.block_path(model, i))
        order = MODEL_STAGES[: MODEL_STAGES.index(model) + 1]
        for st in reversed(order):
            p = self.block_path(st, i)
            if p.exists():
                return self.check_file(p)
        raise FreelunchError(f"block {i} is missing from {self.root}; rerun calibrate")

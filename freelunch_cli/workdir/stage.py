"""The protocol every stage follows, written once: take the stage's lock, begin or resume (or find it done), report
damaged files, time the work, record the summary and print it.

    with open_stage(work, "prune", signature, rep, resume=resume, force=force) as run:
        if run.done:
            return run.summary          # finished earlier with the same options: nothing is redone
        ...                             # the work, unit by unit
        return run.finish(summary, "pruned 30 blocks ...")

A signature is what a stage computes (its inputs and options); a work directory holds one signature per stage,
and a different one is refused unless ``--force`` starts the stage over, with the stages built from it
(``workdir.dependencies``); stages that never read it keep their work.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.workdir.dependencies import dependents
from freelunch_cli.workdir.directory import STAGE_OUTPUTS, StageRecord, WorkDir
from freelunch_cli.workdir.locks import stage_lock


class StageState(Enum):
    """How a stage starts."""

    FRESH = "fresh"  # no earlier run, or --force: outputs of this stage and of those built from it were cleared
    RESUMED = "resumed"  # an interrupted run continues (or damaged files are recomputed)
    DONE = "done"  # finished earlier with the same signature: nothing to do


@dataclass
class StageRun:
    """One run of a stage, as ``open_stage`` hands it to the stage's body."""

    work: WorkDir
    name: str
    state: StageState
    damaged: list[str] = field(default_factory=list)  # manifest keys of files found damaged, now forgotten
    summary: dict = field(default_factory=dict)
    line: str | None = None  # the one-line summary printed when the stage ends
    started: float = field(default_factory=time.time)

    @property
    def done(self) -> bool:
        return self.state is StageState.DONE

    def seconds(self) -> float:
        """Wall seconds since the stage began in this process."""
        return time.time() - self.started

    def finish(self, summary: dict, line: str, config=None) -> dict:
        """Mark the stage done with its summary (the manifest's record), to be printed as ``line``.

        The summary gains the stage's wall ``seconds`` (unless it reports its own) and, given ``config``, the options
        it ran with (the config dataclass as a dict).
        """
        summary = {**summary, "seconds": summary.get("seconds", round(self.seconds(), 2))}
        if config is not None:
            summary["config"] = dataclasses.asdict(config)
        _mark_done(self.work, self.name, summary)
        self.summary, self.line = summary, line
        return summary

    def report(self, line: str, data: dict) -> dict:
        """End without marking the stage done (another worker finishes it); ``data`` is this process's summary."""
        self.summary, self.line = data, line
        return data


@contextmanager
def open_stage(work: WorkDir, name: str, signature: dict, rep, *, resume: bool, force: bool, shared: bool = False):
    """Run a stage's body under its lock as a ``StageRun``; print its summary line once the lock is released.

    ``shared``: sharded workers (``reconstruct --shard``) hold the lock together. Raises FreelunchError for a
    different signature without ``force``, an interrupted run without ``resume``, or a second process.
    """
    with stage_lock(work, name, shared=shared):
        state, damaged = begin(work, name, signature, resume, force)
        run = StageRun(work, name, state, damaged)
        if run.done:
            run.summary, run.line = work.stage(name).summary, f"{name} already done in {work.root}"
        elif damaged:
            names = ", ".join(damaged[:6])
            rep.warn(f"recomputing {len(damaged)} missing or damaged file(s): {names}")
        yield run
    if run.line is not None:
        rep.summary(run.line, run.summary)


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


def finished(work: WorkDir, name: str, signature: dict) -> bool:
    """Whether stage ``name`` is done with this signature and none of its files is missing or damaged: what a run with
    the same options will find (``StageState.DONE``), so that it can skip preparing inputs it will not read."""
    old = work.stage(name) if work.exists() else None
    return (
        old is not None and old.status == "done" and not _differences(old.signature, signature) and not work.damaged_files(name)
    )


def check_signature(work: WorkDir, name: str, signature: dict, force: bool) -> StageRecord | None:
    """The stage's earlier record; refuses (FreelunchError naming the differences) another signature without ``force``.

    Keys missing on either side count as None, so options added later keep older work directories valid.
    """
    old = work.stage(name) if work.exists() else None
    diff = "; ".join(_differences(old.signature, signature)) if old is not None and not force else ""
    if diff:
        what = "another run" if name == "calibrate" else f"another {name} configuration"
        built = dependents(work.manifest()["stages"], name)
        raise FreelunchError(
            f"{work.root} holds {what} ({diff}); use a new --work, or --force to redo {name}"
            + (f" (and discard {', '.join(built)}, built from it)" if built else "")
        )
    return old


def begin(work: WorkDir, name: str, signature: dict, resume: bool, force: bool) -> tuple[StageState, list[str]]:
    """Start or continue a stage: its state and the damaged files it must recompute.

    Refuses a different signature (another model, data, seed or config) unless ``force``, and a half-finished
    stage unless ``resume`` or ``force``. Starting a stage over clears its outputs and those of the stages built from
    it (``dependencies.dependents``); every other stage is kept. Atomic: concurrent workers starting the same stage
    create it once.
    """
    with work.manifest_lock():
        old = check_signature(work, name, signature, force)
        if old is not None and not force:
            bad = work.damaged_files(name)
            if bad:
                names = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
                if not resume:
                    raise FreelunchError(
                        f"{len(bad)} file(s) of {name} in {work.root} are missing or damaged ({names}); "
                        f"rerun with --resume to recompute them"
                    )
                work.forget(bad)
                with work.update() as m:
                    m["stages"][name]["status"] = "running"
                return StageState.RESUMED, bad
            if old.status == "done":
                return StageState.DONE, []
            if not resume:
                raise FreelunchError(
                    f"{name} was interrupted in {work.root}; rerun with --resume to continue, or --force to start it over"
                )
            return StageState.RESUMED, []
        clear(work, [name, *dependents(work.manifest()["stages"], name)])
        with work.update() as m:
            m["stages"][name] = {
                "status": "running",
                "signature": signature,
                "run_id": uuid.uuid4().hex[:12],
                "started": time.time(),
                "summary": {},
            }
        return StageState.FRESH, []


def _mark_done(work: WorkDir, name: str, summary: dict) -> None:
    with work.update() as m:
        s = m["stages"][name]
        s["status"] = "done"
        s["finished"] = time.time()
        s["summary"] = summary


def clear(work: WorkDir, stages) -> None:
    """Delete the outputs and manifest entries of these stages."""
    with work.update() as m:
        for st in stages:
            m["stages"].pop(st, None)
            for out in STAGE_OUTPUTS.get(st, []):
                acts = work.acts_dir_here()  # None: the cache lies on other nodes, out of reach here
                p = (
                    (acts / out[5:] if acts else None)
                    if out.startswith("acts/")
                    else (acts if out == "acts" else work.root / out)
                )
                prefix = out + "/"
                for k in [k for k in m["files"] if k.startswith(prefix)]:
                    del m["files"][k]
                if p is not None and p.is_dir():
                    shutil.rmtree(p)

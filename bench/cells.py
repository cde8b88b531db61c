"""Benchmark cells on SmolLM2-135M: shared calibrated and pruned bases, one hard-linked copy per cell.

A cell is (calibration, pruning, adaptation). Calibrating and pruning happen once per distinct input and are
reused by every cell that shares them; each cell's reconstruction or retraining runs on a hard-linked copy
(every write in a work directory replaces files, so copies stay independent). Each finished cell appends one
JSON line to the results file, so an interrupted benchmark resumes where it stopped, and then deletes its copy
(about 0.8 GB of reconstructed weights each; sixty kept copies took 56 GB) unless a cell continues
from it or the script runs with --keep-work.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import HELDOUT, SHAKESPEARE, calibrate_args, clone_work, run_stage

# Options both bench/sweep.py and bench/paper.py build their cells from, spelled the same way so that equal cells
# have equal inputs (and one script reuses the other's records): Wanda with dense-model statistics (as good as the
# sequential default and cheaper: docs/results.md), reconstruction and retraining at their CLI default lrs.
WANDA50 = ("--criterion", "wanda", "--sparsity", "0.5", "--stats", "dense")
RECON_LR = "1e-3"
# Every recorded reconstruction cell that does not say otherwise trained one epoch per window, the CLI default
# when it ran; pinning it keeps a cell's meaning fixed when the default changes (it became 2 epochs).
RECON_EPOCHS = "1"


def prune_as_run(opts) -> tuple[str, ...]:
    """prune options as measured: every recorded cell that names no --stats used the pruned-stream statistics, the
    CLI default then (it became the dense statistics calibrate gathers)."""
    return (*opts, *(() if "--stats" in opts else ("--stats", "sparse")))


def recon_as_run(opts) -> tuple[str, ...]:
    """reconstruct options as measured: one epoch unless the cell names its epochs or steps."""
    return (*opts, *(() if {"--epochs", "--steps"} & set(opts) else ("--epochs", RECON_EPOCHS)))


def retrain_as_run(opts) -> tuple[str, ...]:
    """retrain options as measured. Every recorded cell that names no --peft trained every weight, and none that
    omits --grad-checkpoint recomputed: the CLI defaults then. Since then a reconstructed model defaults to
    masked-LoRA adapters and every PEFT variant to recomputation, so those are spelled out where they differ."""
    peft = opts[opts.index("--peft") + 1] if "--peft" in opts else None
    start = opts[opts.index("--from") + 1] if "--from" in opts else "latest"
    pinned = ("--peft", "full") if peft is None and start not in ("pruned", "dense") else ()
    pinned += ("--no-grad-checkpoint",) if peft not in (None, "full") and "--grad-checkpoint" not in opts else ()
    return (*opts, *pinned)


def window(kind: str = "block", *extra: str) -> tuple[str, ...]:
    """reconstruct options: a window kind at the default learning rate, then any extras."""
    return ("--window", kind, "--lr", RECON_LR, *extra)


def retrain(start: str = "pruned", epochs: int = 1, lr: str = "1e-4", *extra: str) -> tuple[str, ...]:
    """retrain options: next-token fine-tuning from a stage for a number of epochs at learning rate ``lr``."""
    return ("--from", start, "--lr", lr, "--epochs", str(epochs), *extra)


@dataclass(frozen=True)
class Cell:
    name: str
    prune: tuple[str, ...] = ("--criterion", "wanda", "--sparsity", "0.5")
    recon: tuple[str, ...] | None = None  # reconstruct options, or None
    retrain: tuple[str, ...] | None = None  # retrain options, or None
    samples: int = 128
    seqlen: int = 512
    seed: int = 0  # calibration windows, and the data order of reconstruct and retrain
    extra_calib: tuple[str, ...] = ()
    group: str = ""
    after: str | None = None  # a finished cell with the same calibration, pruning and reconstruct options: start from its model

    @property
    def inputs(self) -> str:
        """What determines a cell's numbers (everything but its name, group and where it starts), as a key: equal
        inputs, equal record."""
        return repr(
            (
                list(self.prune),
                list(self.recon or []),
                list(self.retrain or []),
                self.samples,
                self.seqlen,
                self.seed,
                list(self.extra_calib),
            )
        )

    @property
    def calib_key(self) -> str:
        extra = "-".join(a.strip("-").replace("/", "_") for a in self.extra_calib)
        return f"c{self.samples}x{self.seqlen}s{self.seed}" + (f"-{extra}" if extra else "")

    @property
    def prune_key(self) -> str:
        return self.calib_key + "-" + "-".join(a.strip("-").replace(":", "of").replace("/", "_") for a in self.prune)


def training_tokens(rec: dict) -> list[int]:
    """Tokens a recorded cell trained on, one entry per training stage (reconstruct epochs count, retrain reports its own)."""
    recon = list((rec.get("cell") or {}).get("recon") or [])
    epochs = int(recon[recon.index("--epochs") + 1]) if "--epochs" in recon else int(RECON_EPOCHS)
    return ([rec["calib_tokens"] * epochs] if rec.get("recon_seconds") else []) + (
        [rec["retrain_tokens"]] if rec.get("retrain_tokens") else []
    )


def cost(rec: dict) -> tuple[float, float]:
    """A recorded cell's training cost: seconds of reconstruct and retrain together, and the larger of their peaks (0 if none)."""
    return (
        (rec.get("recon_seconds") or 0) + (rec.get("retrain_seconds") or 0),
        max(rec.get("recon_peak_mib") or 0, rec.get("retrain_peak_mib") or 0),
    )


def continued_from(cells) -> frozenset:
    """Cells that others start from (Cell.after): their work directories must outlive their records."""
    return frozenset(c.after for c in cells if c.after is not None)


def inputs_of(cell: dict) -> str:
    """Cell.inputs of a recorded cell (records hold the cell as a dict)."""
    return Cell(**{k: tuple(v) if isinstance(v, list) else v for k, v in cell.items()}).inputs


@dataclass
class Runner:
    root: Path
    results: Path
    eval_windows: int = 40
    shared: tuple[Path, ...] = ()  # other scripts' results files (same eval windows): a cell with equal inputs is not rerun
    keep: frozenset = frozenset()  # cells whose work directories outlive their record (another cell continues from them)
    keep_work: bool = False  # keep every cell's work directory (to inspect or export its model)
    done: dict = field(default_factory=dict)
    known: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        for path in (self.results, *self.shared):
            for line in path.read_text().splitlines() if path.exists() else []:
                rec = json.loads(line)
                if path == self.results:
                    self.done[rec["name"]] = rec
                self.known.setdefault(inputs_of(rec["cell"]), (path, rec))

    def work_dir(self, cell: Cell, name: str | None = None) -> Path:
        """Where a cell (or the cell ``name`` with the same pruning, e.g. the one it continues from) adapts its model."""
        return self.root / f"{cell.prune_key}--{name or cell.name}"

    def calibrated(self, cell: Cell) -> tuple[Path, dict]:
        work = self.root / cell.calib_key
        s = run_stage(
            *calibrate_args(work, cell.samples, cell.seqlen, None, "--seed", str(cell.seed), *cell.extra_calib), "--resume"
        )
        return work, s

    def pruned(self, cell: Cell) -> tuple[Path, dict]:
        base, cal = self.calibrated(cell)
        work = self.root / cell.prune_key
        clone_work(base, work)
        s = run_stage("prune", "--work", str(work), *prune_as_run(cell.prune), "--resume")
        return work, {"calibrate": cal, "prune": s}

    def dense(self, work: Path) -> dict:
        """The dense model's perplexities: the same for every cell (the model and eval texts do not change), so measured once."""
        known = next((r["dense"] for r in self.done.values() if "dense" in r), None)
        return known or self.evaluate(work, "dense")

    def evaluate(self, work: Path, stage: str) -> dict:
        out = {}
        for name, path in (("wikitext", HELDOUT), ("shakespeare", SHAKESPEARE)):
            r = run_stage(
                "eval",
                "--work",
                str(work),
                "--stage",
                stage,
                "--ppl",
                str(path),
                "--seqlen",
                "512",
                "--limit-windows",
                str(self.eval_windows),
            )["results"][0]
            out[name] = r["ppl"]
            out["eval_tokens"] = r["tokens"]
        return out

    def run(self, cell: Cell) -> dict:
        if cell.name in self.done:
            return self.done[cell.name]
        if cell.inputs in self.known:  # measured by another script: record it here under this cell's name
            path, prior = self.known[cell.inputs]
            return self.record(
                {
                    **prior,
                    "name": cell.name,
                    "group": cell.group,
                    "cell": asdict(cell),
                    "measured_as": f"{path.name}:{prior.get('measured_as', prior['name'])}",
                }
            )
        t0 = time.time()
        base, pre = self.pruned(cell)
        rec = {
            "name": cell.name,
            "group": cell.group,
            "cell": asdict(cell),
            "calib_tokens": cell.samples * cell.seqlen,
            "prune_seconds": pre["prune"].get("seconds"),
            "prune_peak_mib": pre["prune"].get("_peak_rss_mib"),
        }
        if cell.recon is None and cell.retrain is None:
            rec.update(stage="pruned", **self.evaluate(base, "pruned"), dense=self.dense(base))
        else:
            work = self.work_dir(cell)
            stage = "pruned" if cell.recon is None else "reconstructed"
            if cell.after is not None:  # continue from that cell's reconstruction instead of repeating it
                prior = self.done[cell.after]
                assert (prior["cell"]["prune"], prior["cell"]["recon"], prior["cell"]["seed"]) == (
                    list(cell.prune),
                    list(cell.recon),
                    cell.seed,
                )
                source = self.work_dir(cell, cell.after)
                if not source.is_dir():  # its record was taken over from another script, or its directory was deleted
                    sys.exit(
                        f"{cell.name}: the work directory of {cell.after} is not under {self.root}; it was recorded by "
                        f"another script or deleted; remove {cell.after}'s line from {self.results} to rerun it"
                    )
                clone_work(source, work)
                rec.update(
                    {
                        k: prior.get(k)
                        for k in (
                            "recon_seconds",
                            "recon_peak_mib",
                            "window",
                            "recon_loss_before",
                            "recon_loss_after",
                            "trainable_params",
                        )
                    }
                )
            else:
                clone_work(base, work)
                if cell.recon is not None:
                    r = run_stage(
                        "reconstruct",
                        "--work",
                        str(work),
                        "--keep-cache",
                        *recon_as_run(cell.recon),
                        "--seed",
                        str(cell.seed),
                        "--resume",
                    )
                    rec.update(
                        recon_seconds=r.get("seconds"),
                        recon_peak_mib=r["_peak_rss_mib"],
                        window=r.get("window"),
                        recon_loss_before=r.get("loss_before"),
                        recon_loss_after=r.get("loss_after"),
                        trainable_params=r.get("trainable_params"),
                    )
            if cell.retrain is not None:
                t = run_stage("retrain", "--work", str(work), *retrain_as_run(cell.retrain), "--seed", str(cell.seed), "--resume")
                stage = "retrained"
                rec.update(
                    retrain_seconds=t.get("seconds"),
                    retrain_peak_mib=t["_peak_rss_mib"],
                    retrain_tokens=t.get("tokens"),
                    retrain_trainable_params=t.get("trainable_params"),
                )
            rec.update(stage=stage, **self.evaluate(work, stage))
        rec["wall_seconds"] = round(time.time() - t0, 1)
        rec["measured_on"] = time.strftime("%Y-%m-%d %H:%M")
        rec = self.record(rec)
        if cell.name not in self.keep and not self.keep_work:
            shutil.rmtree(self.work_dir(cell), ignore_errors=True)
        return rec

    def record(self, rec: dict) -> dict:
        line = json.dumps(rec)
        rec = json.loads(line)  # held as it will be read back (lists, not tuples), so a cell continuing from it compares equal
        with open(self.results, "a") as f:
            f.write(line + "\n")
        self.done[rec["name"]] = rec
        self.known.setdefault(inputs_of(rec["cell"]), (self.results, rec))
        how = f"from {rec['measured_as']}" if "measured_as" in rec else f"{rec['wall_seconds']:.0f}s"
        print(f"{rec['name']}: wikitext {rec['wikitext']:.2f}, shakespeare {rec['shakespeare']:.2f}, {how}", flush=True)
        return rec

"""Benchmark cells on SmolLM2-135M: shared calibrated and pruned bases, one hard-linked copy per cell.

A cell is (calibration, pruning, adaptation). Calibrating and pruning happen once per distinct input and are
reused by every cell that shares them; each cell's reconstruction or retraining runs on a hard-linked copy
(every write in a work directory replaces files, so copies stay independent). Each finished cell appends one
JSON line to the results file, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import CALIB, HELDOUT, SHAKESPEARE, clone_work, run_stage, smollm2_gguf


@dataclass(frozen=True)
class Cell:
    name: str
    prune: tuple[str, ...] = ("--criterion", "wanda", "--sparsity", "0.5")
    recon: tuple[str, ...] | None = None  # reconstruct options, or None
    retrain: tuple[str, ...] | None = None  # retrain options, or None
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    extra_calib: tuple[str, ...] = ()
    group: str = ""

    @property
    def calib_key(self) -> str:
        extra = "-".join(a.strip("-").replace("/", "_") for a in self.extra_calib)
        return f"c{self.samples}x{self.seqlen}s{self.seed}" + (f"-{extra}" if extra else "")

    @property
    def prune_key(self) -> str:
        return self.calib_key + "-" + "-".join(a.strip("-").replace(":", "of").replace("/", "_") for a in self.prune)


@dataclass
class Runner:
    root: Path
    results: Path
    eval_windows: int = 40
    done: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        if self.results.exists():
            for line in self.results.read_text().splitlines():
                rec = json.loads(line)
                self.done[rec["name"]] = rec

    def calibrated(self, cell: Cell) -> tuple[Path, dict]:
        work = self.root / cell.calib_key
        s = run_stage("calibrate", "--model", str(smollm2_gguf()), "--data", str(CALIB), "--samples", str(cell.samples),
                      "--seqlen", str(cell.seqlen), "--seed", str(cell.seed), *cell.extra_calib, "--work", str(work), "--resume")
        return work, s

    def pruned(self, cell: Cell) -> tuple[Path, dict]:
        base, cal = self.calibrated(cell)
        work = self.root / cell.prune_key
        clone_work(base, work)
        s = run_stage("prune", "--work", str(work), *cell.prune, "--resume")
        return work, {"calibrate": cal, "prune": s}

    def evaluate(self, work: Path, stage: str) -> dict:
        out = {}
        for name, path in (("wikitext", HELDOUT), ("shakespeare", SHAKESPEARE)):
            r = run_stage("eval", "--work", str(work), "--stage", stage, "--ppl", str(path), "--seqlen", "512",
                          "--limit-windows", str(self.eval_windows))["results"][0]
            out[name] = r["ppl"]
            out["eval_tokens"] = r["tokens"]
        return out

    def run(self, cell: Cell) -> dict:
        if cell.name in self.done:
            return self.done[cell.name]
        t0 = time.time()
        base, pre = self.pruned(cell)
        rec = {"name": cell.name, "group": cell.group, "cell": asdict(cell), "calib_tokens": cell.samples * cell.seqlen,
               "prune_seconds": pre["prune"].get("seconds"), "prune_peak_mib": pre["prune"].get("_peak_rss_mib")}
        if cell.recon is None and cell.retrain is None:
            rec.update(stage="pruned", **self.evaluate(base, "pruned"), dense=self.evaluate(base, "dense"))
        else:
            work = self.root / f"{cell.prune_key}--{cell.name}"
            clone_work(base, work)
            stage = "pruned"
            if cell.recon is not None:
                r = run_stage("reconstruct", "--work", str(work), "--keep-cache", *cell.recon, "--resume")
                stage = "reconstructed"
                rec.update(recon_seconds=r.get("seconds"), recon_peak_mib=r["_peak_rss_mib"], window=r.get("window"),
                           recon_loss_before=r.get("loss_before"), recon_loss_after=r.get("loss_after"),
                           trainable_params=r.get("trainable_params"))
            if cell.retrain is not None:
                t = run_stage("retrain", "--work", str(work), *cell.retrain, "--resume")
                stage = "retrained"
                rec.update(retrain_seconds=t.get("seconds"), retrain_peak_mib=t["_peak_rss_mib"], retrain_tokens=t.get("tokens"))
            rec.update(stage=stage, **self.evaluate(work, stage))
        rec["wall_seconds"] = round(time.time() - t0, 1)
        with open(self.results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.done[cell.name] = rec
        print(f"{cell.name}: wikitext {rec['wikitext']:.2f}, shakespeare {rec['shakespeare']:.2f}, {rec['wall_seconds']:.0f}s", flush=True)
        return rec

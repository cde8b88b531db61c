"""Reproduce the paper's three findings on SmolLM2-135M and write bench/RESULTS.md (+ bench/out/paper.json).

    python bench/paper.py            # the full tables (hours on 2 CPU cores; resumes where it stopped)
    python bench/paper.py --quick    # Wanda 50%: none, block reconstruction, retraining 1x (32 x 256 tokens), 8.5 minutes on 2 cores
    python bench/paper.py --only wanda50-retrain-4x,ria-50-block   # just these cells (the table keeps the others)

1. Reconstruction vs. retraining: Wanda 50% without adaptation, with block reconstruction, and with global
   retraining on 1x, 4x and 16x the calibration tokens (epochs over the calibration windows).
2. Granularity: matrix, submodule, block, blocks:3, blocks:10 windows.
3. Criterion: magnitude, random, Wanda, RIA, SparseGPT at 50% and 2:4, without and with block reconstruction.
Headline cells (Wanda 50% with and without reconstruction, magnitude 50% with) use seeds 0, 1, 2.
Calibration: calib.txt (WikiText-2, articles 1-31); perplexity: heldout.txt (articles 32-62) and Tiny
Shakespeare, 40 windows of 512 tokens each. Reconstruction and retraining run at their CLI default learning
rates, reconstruction for one epoch per window (the default when these cells were measured; bench/cells.py pins
it, the CLI default is now two); Wanda uses dense-model statistics (`--stats dense`), as bench/sweep.py does. A cell whose inputs equal
one that bench/sweep.py already measured takes that record (marked `measured_as`) instead of running again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cells import Cell, Runner, continued_from, cost, retrain, training_tokens, window  # noqa: E402
from common import ROOT, machine, markdown_table, mean_std, write_json, write_section  # noqa: E402

BLOCK = window("block")
CRITERIA = ["magnitude", "random", "wanda", "ria", "sparsegpt"]


def ppl(x: float) -> str:
    """Perplexity for a table: two decimals, or scientific notation where a criterion destroys the model."""
    return f"{x:.2f}" if x < 1e4 else f"{x:.1e}"


def prune_args(criterion: str, pattern: str | None) -> tuple[str, ...]:
    stats = ("--stats", "dense") if criterion == "wanda" else ()
    return ("--criterion", criterion, *(("--pattern", pattern) if pattern else ("--sparsity", "0.5")), *stats)


def cells(quick: bool) -> list[Cell]:
    size = {"samples": 32, "seqlen": 256} if quick else {}
    w50 = prune_args("wanda", None)
    out = []
    for seed in [0] if quick else [0, 1, 2]:
        out += [
            Cell(f"wanda50-s{seed}", w50, seed=seed, group="headline", **size),
            Cell(f"wanda50-block-s{seed}", w50, BLOCK, seed=seed, group="headline", **size),
        ]
        if not quick:  # --quick keeps to experiment 1's Wanda cells (under 15 minutes on 2 cores)
            out.append(Cell(f"magnitude50-block-s{seed}", prune_args("magnitude", None), BLOCK, seed=seed, group="headline"))
    for mult in [1] if quick else [1, 4, 16]:
        out.append(Cell(f"wanda50-retrain-{mult}x", w50, retrain=retrain("pruned", mult), group="retrain", **size))
    if quick:
        return out
    for kind in ("matrix", "submodule", "blocks:3", "blocks:10"):
        out.append(Cell(f"wanda50-{kind.replace(':', '')}", w50, window(kind), group="granularity"))
    for pattern in (None, "2:4"):
        for crit in CRITERIA:
            tag = f"{crit}-{'2of4' if pattern else '50'}"
            out.append(Cell(tag, prune_args(crit, pattern), group="criterion"))
            out.append(Cell(f"{tag}-block", prune_args(crit, pattern), BLOCK, group="criterion"))
    return out


def above(x: float, best: float) -> str:
    """How far x is above best: a percentage, or a factor once it is ten times or more."""
    return f"+{100 * (x / best - 1):.0f}%" if x < 10 * best else f"x{x / best:,.0f}"


def seeds_of(recs: dict, stem: str) -> list[dict]:
    """The records of one cell's seed replicates (stem + seed number)."""
    return [r for n, r in recs.items() if n.startswith(stem) and n[len(stem) :].isdigit()]


def headline(recs: dict) -> str:
    """The table the README shows: one row per finding's key cell, with what each adaptation costs."""
    header = ["model", "seeds", "WikiText ppl", "Shakespeare ppl", "training tokens", "seconds", "peak RSS MiB"]
    dense = next((r["dense"] for r in recs.values() if "dense" in r), None)
    rows = [["dense", "", f"{dense['wikitext']:.2f}", f"{dense['shakespeare']:.2f}", "-", "-", "-"]] if dense else []
    for label, stem in (
        ("Wanda 50%, no adaptation", "wanda50-s"),
        ("Wanda 50% + block reconstruction", "wanda50-block-s"),
        ("Wanda 50% + retraining 1x", "wanda50-retrain-1x"),
        ("Wanda 50% + retraining 4x", "wanda50-retrain-4x"),
        ("Wanda 50% + retraining 16x", "wanda50-retrain-16x"),
        ("magnitude 50%, no adaptation", "magnitude-50"),
        ("magnitude 50% + block reconstruction", "magnitude50-block-s"),
        ("SparseGPT 50%, no adaptation", "sparsegpt-50"),
        ("SparseGPT 50% + block reconstruction", "sparsegpt-50-block"),
    ):
        rs = seeds_of(recs, stem) or ([recs[stem]] if stem in recs else [])
        if not rs:
            continue
        secs, peaks = zip(*(cost(x) for x in rs))
        rows.append(
            [
                label,
                str(len(rs)),
                mean_std([x["wikitext"] for x in rs]),
                mean_std([x["shakespeare"] for x in rs]),
                " + ".join(f"{t:,}" for t in training_tokens(rs[0])) or "0",
                f"{min(secs):.0f}" if any(secs) else "-",
                f"{max(peaks):.0f}" if any(peaks) else "-",
            ]
        )
    return markdown_table(header, rows)


def write_results(recs: dict, quick: bool, command: str, eval_windows: int) -> str:
    def get(name):
        return recs.get(name)

    lines = [
        f"## The paper's findings on SmolLM2-135M{' (quick subset)' if quick else ''}",
        "",
        f"Written by `{command}` on {machine()['date']} ({machine()['cpu_cores']} CPU cores, {machine()['platform']}; "
        f"torch {machine()['torch']}, transformers {machine()['transformers']}). Every number below comes "
        "from a run of this script or of `bench/sweep.py` on this machine (per-cell records in `bench/out/paper.json`; a record "
        "marked `measured_as` was taken, unchanged, from the sweep cell with the same inputs).",
        "",
        f"Perplexity on {eval_windows} x 512 tokens of held-out WikiText (articles 32-62, `heldout.txt`) and of Tiny Shakespeare "
        "(out of domain). Calibration: 128 x 512 tokens of `calib.txt`" + (" (quick: 32 x 256)" if quick else "") + ".",
        "",
    ]
    dense = next((r["dense"] for r in recs.values() if "dense" in r), None)
    if dense:
        lines += [f"Dense model: WikiText {dense['wikitext']:.2f}, Tiny Shakespeare {dense['shakespeare']:.2f}.", ""]
    lines += [
        "### Headline (mean ± std where a cell ran with 3 seeds; the seed sets the calibration windows, the masks and the data order)",
        "",
        headline(recs),
        "",
    ]
    # experiment 1
    lines += ["### 1. Local reconstruction vs. global retraining (Wanda 50%)", ""]
    rows = []
    for label, name in (
        ("no adaptation", "wanda50-s0"),
        ("block reconstruction", "wanda50-block-s0"),
        ("retraining 1x", "wanda50-retrain-1x"),
        ("retraining 4x", "wanda50-retrain-4x"),
        ("retraining 16x", "wanda50-retrain-16x"),
    ):
        r = get(name)
        if r:
            secs, mem = cost(r)
            rows.append(
                [
                    label,
                    f"{r['wikitext']:.2f}",
                    f"{r['shakespeare']:.2f}",
                    " + ".join(map(str, training_tokens(r))) or "0",
                    f"{secs:.0f}",
                    f"{mem:.0f}" if mem else "-",
                ]
            )
    lines += [
        markdown_table(["adaptation", "WikiText ppl", "Shakespeare ppl", "training tokens", "seconds", "peak RSS MiB"], rows),
        "",
    ]
    # experiment 2
    rows = []
    for label, name in (
        ("matrix", "wanda50-matrix"),
        ("submodule", "wanda50-submodule"),
        ("block", "wanda50-block-s0"),
        ("blocks:3", "wanda50-blocks3"),
        ("blocks:10", "wanda50-blocks10"),
    ):
        r = get(name)
        if r:
            rows.append(
                [
                    label,
                    f"{r['wikitext']:.2f}",
                    f"{r['shakespeare']:.2f}",
                    f"{r['recon_seconds']:.0f}",
                    f"{r['recon_peak_mib']:.0f}",
                ]
            )
    if rows:
        lines += [
            "### 2. Granularity (Wanda 50%)",
            "",
            markdown_table(["window", "WikiText ppl", "Shakespeare ppl", "seconds", "peak RSS MiB"], rows),
            "",
        ]
    # experiment 3: finding 3 asks how far each criterion stays from the best one once reconstructed
    rows = []
    for pattern, tag in (("50% unstructured", "50"), ("2:4", "2of4")):
        best = min((r["wikitext"] for c in CRITERIA if (r := get(f"{c}-{tag}-block"))), default=None)
        for crit in CRITERIA:
            a, b = get(f"{crit}-{tag}"), get(f"{crit}-{tag}-block")
            if a or b:
                rows.append(
                    [
                        crit,
                        pattern,
                        ppl(a["wikitext"]) if a else "-",
                        ppl(b["wikitext"]) if b else "-",
                        above(b["wikitext"], best) if b else "-",
                        ppl(a["shakespeare"]) if a else "-",
                        ppl(b["shakespeare"]) if b else "-",
                    ]
                )
    if rows:
        lines += [
            "### 3. Criterion, without and with block reconstruction",
            "",
            "*vs. best*: the reconstructed model's WikiText perplexity above the best reconstructed criterion of the same pattern.",
            "",
            markdown_table(
                [
                    "criterion",
                    "pattern",
                    "WikiText (pruned)",
                    "WikiText (+ block)",
                    "vs. best",
                    "Shakespeare (pruned)",
                    "Shakespeare (+ block)",
                ],
                rows,
            ),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--root", default=None)
    ap.add_argument("--only", default=None, help="comma-separated cell names (the others keep their recorded results)")
    ap.add_argument("--keep-work", action="store_true", help="keep each cell's work directory (by default deleted once recorded)")
    a = ap.parse_args()
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    root = Path(a.root) if a.root else ROOT / "runs" / ("bench-quick" if a.quick else "bench")
    plan = cells(a.quick)
    runner = Runner(
        root,
        out / ("paper-quick.jsonl" if a.quick else "paper.jsonl"),
        eval_windows=10 if a.quick else 40,
        shared=() if a.quick else (out / "sweep.jsonl",),
        keep=continued_from(plan),
        keep_work=a.keep_work,
    )
    only = set(a.only.split(",")) if a.only else None
    for cell in plan:
        if only is None or cell.name in only:
            runner.run(cell)
    command = "python bench/paper.py" + (" --quick" if a.quick else "")
    text = write_results(runner.done, a.quick, command, runner.eval_windows)
    if a.quick:
        (out / "RESULTS-quick.md").write_text(text + "\n")
    else:
        write_section(ROOT / "bench" / "RESULTS.md", "paper", text)
        for page in (ROOT / "README.md", ROOT / "docs" / "results.md"):  # the headline table, the same on both pages
            write_section(
                page,
                "paper-headline",
                f"Written by `{command}` on {machine()['date']}; all cells in `bench/RESULTS.md`.\n\n" + headline(runner.done),
            )
    write_json(
        out / ("paper-quick.json" if a.quick else "paper.json"), {"machine": machine(), "command": command, "cells": runner.done}
    )
    print(text)


if __name__ == "__main__":
    main()

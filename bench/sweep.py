"""Reconstruction settings on SmolLM2-135M (Wanda 50%): the sweeps behind the defaults.

    python bench/sweep.py --group defaults      # lr / epochs / batch size (issue: reconstruction defaults)
    python bench/sweep.py --group gap           # what closes the gap to retraining
    python bench/sweep.py --group windows       # window kinds and PEFT variants
    python bench/sweep.py --group peft          # PEFT retraining, alone and after reconstruction

Results go to bench/out/sweep.jsonl (one line per finished cell; rerunning skips finished cells) and
a table to bench/out/sweep.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cells import RECON_LR, WANDA50, Cell, Runner, continued_from, cost, recon_as_run, retrain, retrain_as_run, training_tokens  # noqa: E402
from common import ROOT, machine, markdown_table, mean_std, write_section  # noqa: E402

W50 = WANDA50
LR = RECON_LR  # the reconstruction learning rate the other groups use (the defaults group chose it)


def block(*extra: str) -> tuple[str, ...]:
    return ("--window", "block", *extra)


# fmt: off  (one cell a line: a table to read across)
GROUPS = {
    "defaults": [
        Cell("wanda50", W50, group="defaults"),
        Cell("lr1e-4", W50, block("--lr", "1e-4"), group="defaults"),
        Cell("lr1e-3", W50, block("--lr", "1e-3"), group="defaults"),
        Cell("lr3e-3", W50, block("--lr", "3e-3"), group="defaults"),
        Cell("lr1e-3-bs8", W50, block("--lr", "1e-3", "--batch-size", "8"), group="defaults"),
        Cell("lr1e-3-bs1", W50, block("--lr", "5e-4", "--batch-size", "1"), group="defaults"),
        Cell("lr1e-3-ep2", W50, block("--lr", "1e-3", "--epochs", "2"), group="defaults"),
        Cell("lr1e-3-ep2-s1", W50, block("--lr", "1e-3", "--epochs", "2"), seed=1, group="defaults"),
        Cell("lr1e-3-ep3", W50, block("--lr", "1e-3", "--epochs", "3"), group="defaults"),
    ],
    "gap": [
        Cell("retrain-1x", W50, retrain=retrain("pruned"), group="gap"),
        Cell("kl", W50, block("--lr", LR, "--kl-weight", "1"), group="gap"),
        Cell("sparse-inputs", W50, block("--lr", LR, "--inputs", "sparse"), group="gap"),
        Cell("s256", W50, block("--lr", LR), samples=256, group="gap"),
        Cell("s256-retrain-1x", W50, retrain=retrain("pruned"), samples=256, group="gap"),
        Cell("recon+retrain", W50, block("--lr", LR), retrain=retrain("reconstructed"), group="gap"),
        Cell("owl-pruned", W50 + ("--owl", "0.08"), group="gap"),
        Cell("owl", W50 + ("--owl", "0.08"), block("--lr", LR), group="gap"),
        Cell("retrain-2x", W50, retrain=retrain("pruned", 2), group="gap"),
        Cell("retrain-4x", W50, retrain=retrain("pruned", 4), group="gap"),
        Cell("nmse", W50, block("--lr", LR, "--loss", "nmse"), group="gap"),
        # longer sequences at equal tokens: 64 x 1024 instead of 128 x 512
        Cell("s64x1024", W50, block("--lr", LR), samples=64, seqlen=1024, group="gap"),
        # the same, retraining with gradient checkpointing: the memory the combination needs
        Cell(
            "recon+retrain-gc",
            W50,
            block("--lr", LR),
            retrain=retrain("reconstructed") + ("--grad-checkpoint",),
            after="lr1e-3",
            group="gap",
        ),
        # the combination with the 2-epoch default: retraining continues from lr1e-3-ep2's model
        Cell(
            "recon2+retrain",
            W50,
            block("--lr", LR, "--epochs", "2"),
            retrain=retrain("reconstructed"),
            after="lr1e-3-ep2",
            group="gap",
        ),
        # the control: the same fine-tuning of the dense model (no masks) measures the fit to the calibration domain
        Cell("dense-retrain-1x", W50, retrain=retrain("dense"), group="gap"),
    ],
    # seeds 1 and 2 of the comparison (seed 0: wanda50, lr1e-3, retrain-1x, recon+retrain): calibration windows, masks and data order
    "seeds": [
        c
        for seed in (1, 2)
        for c in (
            Cell(f"wanda50-s{seed}", W50, seed=seed, group="seeds"),
            Cell(f"lr1e-3-s{seed}", W50, block("--lr", LR), seed=seed, group="seeds"),
            Cell(f"retrain-1x-s{seed}", W50, retrain=retrain("pruned"), seed=seed, group="seeds"),
            Cell(
                f"recon+retrain-s{seed}",
                W50,
                block("--lr", LR),
                retrain=retrain("reconstructed"),
                seed=seed,
                after=f"lr1e-3-s{seed}",
                group="seeds",
            ),
        )
    ]
    + [
        # the 2-epoch default then retraining, seed 1, in one cell (lr1e-3-ep2-s1's directory was not kept)
        Cell(
            "recon2+retrain-s1", W50, block("--lr", LR, "--epochs", "2"), retrain=retrain("reconstructed"), seed=1, group="seeds"
        ),
    ],
    "windows": [
        Cell("matrix", W50, ("--window", "matrix", "--lr", LR), group="windows"),
        Cell("submodule", W50, ("--window", "submodule", "--lr", LR), group="windows"),
        Cell("blocks3", W50, ("--window", "blocks:3", "--lr", LR), group="windows"),
        Cell("bias-norm", W50, block("--lr", "1e-2", "--peft", "bias-norm"), group="windows"),
        Cell("lora", W50, block("--lr", LR, "--peft", "lora"), group="windows"),
        Cell("masked-lora", W50, block("--lr", LR, "--peft", "masked-lora"), group="windows"),
    ],
    # finding 1 with PEFT: global retraining of what the windows group's PEFT reconstruction trains, at the same
    # ratio to full training's learning rate (bias-norm 10x, adapters 1x); then the least-memory pipeline, the
    # 2-epoch default reconstruction followed by PEFT retraining with recomputed activations
    "peft": [
        Cell("retrain-bias-norm", W50, retrain=retrain("pruned", 1, "1e-3", "--peft", "bias-norm"), group="peft"),
        Cell("retrain-lora", W50, retrain=retrain("pruned", 1, "1e-4", "--peft", "lora"), group="peft"),
        Cell("retrain-masked-lora", W50, retrain=retrain("pruned", 1, "1e-4", "--peft", "masked-lora"), group="peft"),
        # adapters usually want a larger learning rate than full fine-tuning: reconstruction's own (1e-3)
        Cell("retrain-masked-lora-lr1e-3", W50, retrain=retrain("pruned", 1, "1e-3", "--peft", "masked-lora"), group="peft"),
        Cell(
            "recon2+retrain-bias-norm-gc",
            W50,
            block("--lr", LR, "--epochs", "2"),
            retrain=retrain("reconstructed", 1, "1e-3", "--peft", "bias-norm", "--grad-checkpoint"),
            after="lr1e-3-ep2",
            group="peft",
        ),
        Cell(
            "recon2+retrain-masked-lora-gc",
            W50,
            block("--lr", LR, "--epochs", "2"),
            retrain=retrain("reconstructed", 1, "1e-4", "--peft", "masked-lora", "--grad-checkpoint"),
            after="lr1e-3-ep2",
            group="peft",
        ),
        # bias-norm at reconstruction's bias-norm rate (1e-2), alone and after reconstruction; and the cheaper pipeline
        # (1-epoch reconstruction, then bias-norm retraining)
        Cell("retrain-bias-norm-lr1e-2", W50, retrain=retrain("pruned", 1, "1e-2", "--peft", "bias-norm"), group="peft"),
        Cell(
            "recon2+retrain-bias-norm-gc-lr1e-2",
            W50,
            block("--lr", LR, "--epochs", "2"),
            retrain=retrain("reconstructed", 1, "1e-2", "--peft", "bias-norm", "--grad-checkpoint"),
            after="lr1e-3-ep2",
            group="peft",
        ),
        Cell(
            "recon2+retrain-masked-lora-gc-lr1e-3",
            W50,
            block("--lr", LR, "--epochs", "2"),
            retrain=retrain("reconstructed", 1, "1e-3", "--peft", "masked-lora", "--grad-checkpoint"),
            after="lr1e-3-ep2",
            group="peft",
        ),
        Cell(
            "recon2+retrain-masked-lora-gc-lr1e-3-s1",
            W50,
            block("--lr", LR, "--epochs", "2"),
            retrain=retrain("reconstructed", 1, "1e-3", "--peft", "masked-lora", "--grad-checkpoint"),
            seed=1,
            group="peft",
        ),
        Cell(
            "recon1+retrain-bias-norm-gc",
            W50,
            block("--lr", LR, "--epochs", "1"),
            retrain=retrain("reconstructed", 1, "1e-3", "--peft", "bias-norm", "--grad-checkpoint"),
            group="peft",
        ),
        # issue 9 at equal tokens: the pipelines against retraining for as many epochs as they train in all
        Cell(
            "recon2+retrain-masked-lora-gc-lr1e-3-s2",
            W50,
            block("--lr", LR, "--epochs", "2"),
            retrain=retrain("reconstructed", 1, "1e-3", "--peft", "masked-lora", "--grad-checkpoint"),
            seed=2,
            group="peft",
        ),
        Cell("retrain-3x", W50, retrain=retrain("pruned", 3), group="peft"),  # = 2 reconstruction epochs + 1 retraining epoch
        Cell(
            "recon1+retrain-masked-lora-gc-lr1e-3",
            W50,
            block("--lr", LR),  # = retrain-2x's 131,072 tokens
            retrain=retrain("reconstructed", 1, "1e-3", "--peft", "masked-lora", "--grad-checkpoint"),
            group="peft",
        ),
        Cell(
            "recon2+retrain-masked-lora-gc-lr3e-3",
            W50,
            block("--lr", LR, "--epochs", "2"),
            retrain=retrain("reconstructed", 1, "3e-3", "--peft", "masked-lora", "--grad-checkpoint"),
            after="lr1e-3-ep2",
            group="peft",
        ),
    ],
}
# fmt: on


def describe(cell: dict) -> str:
    """What a cell changes, in CLI options: pruning extras, reconstruct options, retrain options, calibration size."""
    parts = []
    extra = list(cell["prune"][len(W50) :])
    if extra:
        parts.append("prune " + " ".join(extra))
    if cell.get("recon"):
        parts.append("reconstruct " + " ".join(recon_as_run(cell["recon"])))
    if cell.get("retrain"):
        parts.append("retrain " + " ".join(retrain_as_run(cell["retrain"])))
    if cell["samples"] != 128 or cell["seqlen"] != 512:
        parts.append(f"calibrate --samples {cell['samples']} --seqlen {cell['seqlen']}")
    if cell["seed"]:
        parts.append(f"seed {cell['seed']}")
    return "; ".join(parts) or "no adaptation"


SEEDED = (
    ("no adaptation", "wanda50"),
    ("block reconstruction, 1 epoch", "lr1e-3"),
    ("block reconstruction, 2 epochs (the default)", "lr1e-3-ep2"),
    ("retraining, 1 epoch", "retrain-1x"),
    ("reconstruction (1 epoch), then full retraining 1 epoch", "recon+retrain"),
    ("reconstruction (2 epochs), then full retraining 1 epoch", "recon2+retrain"),
    (
        "reconstruction (2 epochs), then masked-LoRA retraining 1 epoch (lr 1e-3, --grad-checkpoint): "
        "the defaults of reconstruct, then retrain",
        "recon2+retrain-masked-lora-gc-lr1e-3",
    ),
)


def seed_summary(done: dict) -> list[str]:
    """Mean ± std over seeds 0-2 of the comparison's cells; the gap is measured against each seed's own pruned model."""
    dense = done["wanda50"]["dense"]["wikitext"] if "wanda50" in done else None
    rows = []
    for label, stem in SEEDED:
        runs = [(s, done.get(stem if s == 0 else f"{stem}-s{s}")) for s in (0, 1, 2)]
        runs = [(s, r) for s, r in runs if r]
        pruned = {s: done.get("wanda50" if s == 0 else f"wanda50-s{s}") for s, _ in runs}
        gaps = [(pruned[s]["wikitext"] - r["wikitext"]) / (pruned[s]["wikitext"] - dense) for s, r in runs if pruned[s] and dense]
        if runs:
            secs, peak = zip(*(cost(r) for _, r in runs))
            rows.append(
                [
                    label,
                    str(len(runs)),
                    mean_std([r["wikitext"] for _, r in runs]),
                    mean_std([100 * g for g in gaps], "{:.0f}") + "%" if gaps else "-",
                    mean_std([r["shakespeare"] for _, r in runs]),
                    f"{min(secs):.0f}" if any(secs) else "-",
                    f"{max(peak):.0f}" if any(peak) else "-",
                ]
            )
    if len(rows) < 2:
        return []
    # the fastest seed's time: the others may have shared the cores with another job; memory does not depend on that
    header = [
        "adaptation",
        "seeds",
        "WikiText ppl",
        "gap recovered",
        "Shakespeare ppl",
        "seconds (fastest seed)",
        "peak RSS MiB (max)",
    ]
    return [
        "### Seeds (mean ± std; the seed sets the calibration windows, the masks and the data order)",
        "",
        markdown_table(header, rows),
        "",
    ]


def report(done: dict, command: str) -> str:
    """The sweep's section of bench/RESULTS.md: every cell, with the share of the perplexity gap it recovers."""
    base = done.get("wanda50")
    m = machine()
    lines = [
        "## Reconstruction settings and the gap to retraining (Wanda 50%, dense statistics)",
        "",
        f"Written by `{command}` on {m['date']} ({m['cpu_cores']} CPU cores; torch {m['torch']}, transformers {m['transformers']}); "
        "per-cell records in `bench/out/sweep.jsonl`. SmolLM2-135M, calibration 128 x 512 tokens of `calib.txt` unless a cell says "
        "otherwise; perplexity on 40 x 512 tokens of `heldout.txt` (WikiText) and of Tiny Shakespeare.",
        "",
    ]
    if base:
        d, p = base["dense"]["wikitext"], base["wikitext"]
        lines += [
            f"Dense: WikiText {d:.2f}, Shakespeare {base['dense']['shakespeare']:.2f}. Wanda 50% without adaptation: "
            f"{p:.2f}, {base['shakespeare']:.2f}. *Gap recovered* = (pruned - ppl) / (pruned - dense) on WikiText.",
            "",
        ]
    lines += seed_summary(done)
    header = ["cell", "options", "training tokens", "WikiText ppl", "gap recovered", "Shakespeare ppl", "seconds", "peak RSS MiB"]
    for group in GROUPS:
        rows = []
        for rec in (r for r in done.values() if r["group"] == group):
            tokens = [str(t) for t in training_tokens(rec)]
            secs, peak = cost(rec)
            gap = f"{(p - rec['wikitext']) / (p - d):.0%}" if base else "-"
            rows.append(
                [
                    rec["name"],
                    describe(rec["cell"]),
                    " + ".join(tokens) or "0",
                    f"{rec['wikitext']:.2f}",
                    gap,
                    f"{rec['shakespeare']:.2f}",
                    f"{secs:.0f}" if secs else "-",
                    f"{peak:.0f}" if peak else "-",
                ]
            )
        if rows:
            lines += [f"### {group}", "", markdown_table(header, rows), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--group", action="append", choices=sorted(GROUPS), default=[])
    ap.add_argument("--only", default=None, help="comma-separated cell names")
    ap.add_argument("--root", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--keep-work", action="store_true", help="keep each cell's work directory (by default deleted once recorded)")
    a = ap.parse_args()
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(
        Path(a.root),
        out / "sweep.jsonl",
        shared=(out / "paper.jsonl",),
        keep=continued_from(c for cells in GROUPS.values() for c in cells),
        keep_work=a.keep_work,
    )
    only = set(a.only.split(",")) if a.only else None
    for g in a.group:
        for cell in GROUPS[g]:
            if only is None or cell.name in only:
                runner.run(cell)
    text = report(runner.done, "python bench/sweep.py --group defaults --group gap --group seeds --group windows --group peft")
    write_section(ROOT / "bench" / "RESULTS.md", "sweep", text)
    (out / "sweep.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

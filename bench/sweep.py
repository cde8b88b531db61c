"""Reconstruction settings on SmolLM2-135M (Wanda 50%): the sweeps behind the defaults.

    python bench/sweep.py --group defaults      # lr / epochs / batch size (issue: reconstruction defaults)
    python bench/sweep.py --group gap           # what closes the gap to retraining
    python bench/sweep.py --group windows       # window kinds and PEFT variants

Results go to bench/out/sweep.jsonl (one line per finished cell; rerunning skips finished cells) and
a table to bench/out/sweep.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cells import Cell, Runner  # noqa: E402
from common import ROOT, machine, markdown_table  # noqa: E402

W50 = ("--criterion", "wanda", "--sparsity", "0.5", "--stats", "dense")


LR = "1e-3"  # the reconstruction learning rate the other groups use (the defaults group chose it)


def block(*extra: str) -> tuple[str, ...]:
    return ("--window", "block", *extra)


GROUPS = {
    "defaults": [
        Cell("wanda50", W50, group="defaults"),
        Cell("lr1e-4", W50, block("--lr", "1e-4"), group="defaults"),
        Cell("lr1e-3", W50, block("--lr", "1e-3"), group="defaults"),
        Cell("lr3e-3", W50, block("--lr", "3e-3"), group="defaults"),
        Cell("lr1e-3-bs8", W50, block("--lr", "1e-3", "--batch-size", "8"), group="defaults"),
        Cell("lr1e-3-bs1", W50, block("--lr", "5e-4", "--batch-size", "1"), group="defaults"),
        Cell("lr1e-3-ep2", W50, block("--lr", "1e-3", "--epochs", "2"), group="defaults"),
    ],
    "gap": [
        Cell("retrain-1x", W50, retrain=("--from", "pruned", "--lr", "1e-4", "--epochs", "1"), group="gap"),
        Cell("kl", W50, block("--lr", LR, "--kl-weight", "1"), group="gap"),
        Cell("sparse-inputs", W50, block("--lr", LR, "--inputs", "sparse"), group="gap"),
        Cell("s256", W50, block("--lr", LR), samples=256, group="gap"),
        Cell("s256-retrain-1x", W50, retrain=("--from", "pruned", "--lr", "1e-4", "--epochs", "1"), samples=256, group="gap"),
        Cell("recon+retrain", W50, block("--lr", LR), retrain=("--from", "reconstructed", "--lr", "1e-4", "--epochs", "1"), group="gap"),
        Cell("owl", W50 + ("--owl", "0.08"), block("--lr", LR), group="gap"),
        Cell("retrain-4x", W50, retrain=("--from", "pruned", "--lr", "1e-4", "--epochs", "4"), group="gap"),
        Cell("nmse", W50, block("--lr", LR, "--loss", "nmse"), group="gap"),
        # the control: the same fine-tuning of the dense model (no masks) measures the fit to the calibration domain
        Cell("dense-retrain-1x", W50, retrain=("--from", "dense", "--lr", "1e-4", "--epochs", "1"), group="gap"),
    ],
    "windows": [
        Cell("matrix", W50, ("--window", "matrix", "--lr", LR), group="windows"),
        Cell("submodule", W50, ("--window", "submodule", "--lr", LR), group="windows"),
        Cell("blocks3", W50, ("--window", "blocks:3", "--lr", LR), group="windows"),
        Cell("bias-norm", W50, block("--lr", "1e-2", "--peft", "bias-norm"), group="windows"),
        Cell("lora", W50, block("--lr", LR, "--peft", "lora"), group="windows"),
        Cell("masked-lora", W50, block("--lr", LR, "--peft", "masked-lora"), group="windows"),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--group", action="append", choices=sorted(GROUPS), required=True)
    ap.add_argument("--only", default=None, help="comma-separated cell names")
    ap.add_argument("--root", default=str(ROOT / "runs" / "bench"))
    a = ap.parse_args()
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(Path(a.root), out / "sweep.jsonl")
    only = set(a.only.split(",")) if a.only else None
    for g in a.group:
        for cell in GROUPS[g]:
            if only is None or cell.name in only:
                runner.run(cell)
    rows = []
    for rec in runner.done.values():
        rows.append([rec["group"], rec["name"], rec["calib_tokens"], f"{rec['wikitext']:.2f}", f"{rec['shakespeare']:.2f}",
                     round(rec.get("recon_seconds") or rec.get("retrain_seconds") or 0), round(rec.get("recon_peak_mib") or rec.get("retrain_peak_mib") or 0)])
    table = markdown_table(["group", "cell", "calib tokens", "wikitext ppl", "shakespeare ppl", "adapt s", "adapt peak MiB"], rows)
    (out / "sweep.md").write_text(table + f"\n\n{json.dumps(machine())}\n")
    print(table)


if __name__ == "__main__":
    main()

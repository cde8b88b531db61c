"""Held-out perplexity and prune time of every criterion on SmolLM2-135M, without reconstruction.

    python bench/criteria.py [--work runs/bench-criteria] [--eval-windows 40]

Calibrates once (128 x 512 tokens of calib.txt), prunes a hard-linked copy per cell, and writes
bench/out/criteria.md and .json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import HELDOUT, ROOT, calibrate_args, clone_work, machine, markdown_table, run_stage, write_json  # noqa: E402

CELLS = [
    ("magnitude", None, "sparse"),
    ("random", None, "sparse"),
    ("wanda", None, "sparse"),
    ("wanda", None, "dense"),
    ("ria", None, "sparse"),
    ("sparsegpt", None, "sparse"),
    ("magnitude", "2:4", "sparse"),
    ("random", "2:4", "sparse"),
    ("wanda", "2:4", "sparse"),
    ("ria", "2:4", "sparse"),
    ("sparsegpt", "2:4", "sparse"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-criteria"))
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--only", default=None, help="comma-separated criteria")
    a = ap.parse_args()
    root = Path(a.work)
    base = root / "calibrated"
    run_stage(*calibrate_args(base, 128, 512), "--resume")
    ev = ["--ppl", str(HELDOUT), "--seqlen", "512", "--limit-windows", str(a.eval_windows)]
    dense = run_stage("eval", "--work", str(base), *ev, "--stage", "dense")["results"][0]
    rows, records = [["dense", "-", "-", f"{dense['ppl']:.2f}", "-"]], [{"cell": "dense", "ppl": dense["ppl"]}]
    only = set(a.only.split(",")) if a.only else None
    for crit, pat, stats in CELLS:
        if only and crit not in only:
            continue
        name = f"{crit}-{(pat or '50').replace(':', 'of')}-{stats}"
        work = root / name
        clone_work(base, work)
        args = ["prune", "--work", str(work), "--criterion", crit, "--stats", stats, "--resume"]
        args += ["--pattern", pat] if pat else ["--sparsity", "0.5"]
        pr = run_stage(*args)
        res = run_stage("eval", "--work", str(work), *ev, "--stage", "pruned")["results"][0]
        rows.append([crit, pat or "50% unstructured", stats, f"{res['ppl']:.2f}", f"{pr.get('seconds', pr['_wall']):.0f}"])
        records.append(
            {
                "cell": name,
                "criterion": crit,
                "pattern": pat or "0.5",
                "stats": stats,
                "ppl": res["ppl"],
                "prune_seconds": pr.get("seconds"),
                "peak_rss_mib": pr["_peak_rss_mib"],
            }
        )
        print(rows[-1], flush=True)
    table = markdown_table(["criterion", "pattern", "stats", "held-out ppl", "prune seconds"], rows)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "criteria.md").write_text(f"{table}\n\n{machine()}\n")
    write_json(out / "criteria.json", {"machine": machine(), "tokens": dense["tokens"], "cells": records})
    print(table)


if __name__ == "__main__":
    main()

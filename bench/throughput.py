"""How close each stage comes to this machine's matrix-product peak on SmolLM2-135M (CPU), and how much of its time
hashing takes.

    python bench/throughput.py                       # writes bench/out/throughput.json
    python bench/throughput.py --repo ../old --out bench/out/throughput-before.json   # another checkout's code

It measures the float32 matrix-product peak first (the best of square products of the model's width), then runs the
stages through the CLI (so any checkout's code can be measured the same way): calibrate (128 x 512 tokens), prune
with the default options and with pruned-stream statistics (``--stats sparse``: the variant with matrix work), and
one epoch of block reconstruction. Each stage's share of peak is its matrix work (bench/flops.py) over the seconds
its summary reports for that work; the hashing share is the bytes it recorded over this machine's sha256 rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, calibrate_args, machine  # noqa: E402
from flops import block_forward_flops, matmul_peak, sha256_rate  # noqa: E402


def stage(repo: Path, *args: str) -> dict:
    """``freelunch ARGS --json`` with ``repo``'s code; its summary with the wall seconds."""
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run(
        [sys.executable, "-m", "freelunch_cli", *args, "--json", "--quiet"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    ).stdout
    return {**json.loads(out), "_wall": time.time() - t0}


def recorded_bytes(work: Path, folder_prefixes: tuple[str, ...]) -> int:
    files = json.loads((work / "manifest.json").read_text())["files"]
    return sum(rec["size"] for rel, rec in files.items() if rel.startswith(folder_prefixes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(ROOT), help="the checkout whose freelunch_cli runs")
    ap.add_argument("--root", default=str(ROOT / "runs" / "throughput"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "throughput.json"))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()
    repo, root = Path(a.repo).resolve(), Path(a.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    peak = matmul_peak(torch.device("cpu"), torch.float32, 576 * 2)
    hash_rate = sha256_rate()
    work = root / "w"
    cal = stage(repo, *calibrate_args(work, a.samples, a.seqlen))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(work / "dense")
    tokens, n = a.samples * a.seqlen, config.num_hidden_layers
    fwd = block_forward_flops(config, tokens, a.seqlen)  # one block, every calibration token
    sparse = root / "w-sparse"
    subprocess.run(["cp", "-al", str(work), str(sparse)], check=True)
    pr = stage(repo, "prune", "--work", str(work), "--criterion", "wanda", "--sparsity", "0.5")
    pr_sparse = stage(repo, "prune", "--work", str(sparse), "--criterion", "wanda", "--sparsity", "0.5", "--stats", "sparse")
    rc = stage(repo, "reconstruct", "--work", str(work), "--window", "block", "--epochs", "1", "--keep-cache")
    probe = 32 * a.seqlen / tokens  # loss before and after on 32 samples: two forward passes of that share
    recon_flops = n * fwd * (3 + 2 * probe)
    shares = {
        "calibrate_share_of_peak": n * fwd / cal["seconds_dense_pass"] / peak,
        "prune_share_of_peak": (2 * n - 1) * fwd / pr_sparse["seconds"] / peak,  # statistics pass, then the pruned output
        "reconstruct_share_of_peak": recon_flops / rc["window_seconds"] / peak,
    }
    hashing = {
        "calibrate": recorded_bytes(work, ("calib", "dense", "acts/dense")) / hash_rate / cal["seconds"],
        "prune": recorded_bytes(work, ("prune", "pruned")) / hash_rate / pr["seconds"],
        "reconstruct": recorded_bytes(work, ("recon", "windows")) / hash_rate / rc["seconds"],
    }
    result = {
        **shares,
        "peak_gflops_float32": peak / 1e9,
        "sha256_mb_per_s": hash_rate / 1e6,
        "seconds": {
            "calibrate": cal["seconds"],
            "calibrate_dense_pass": cal["seconds_dense_pass"],
            "prune_default": pr["seconds"],
            "prune_stats_sparse": pr_sparse["seconds"],
            "reconstruct_windows": rc["window_seconds"],
            "reconstruct": rc["seconds"],
        },
        "gflops": {
            "calibrate": n * fwd / cal["seconds_dense_pass"] / 1e9,
            "prune_stats_sparse": (2 * n - 1) * fwd / pr_sparse["seconds"] / 1e9,
            "reconstruct": recon_flops / rc["window_seconds"] / 1e9,
        },
        "hashing_share_of_stage": hashing,
        "repo": str(repo),
        "machine": machine(),
        "options": {"samples": a.samples, "seqlen": a.seqlen, "prune": "wanda 0.5", "reconstruct": "block, 1 epoch"},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in {**shares, **result["seconds"]}.items()}, indent=2)
    )


if __name__ == "__main__":
    main()

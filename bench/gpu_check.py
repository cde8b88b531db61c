"""The GPU check of issue 23, run by bench/gpu_check.sh: every stage on random-weight Llama models of real shapes.

For each shape (a 7B-shaped slice: hidden 4096, intermediate 11008, 32 heads, 8 blocks; and SmolLM2-135M's shape) it
builds the model with the SmolLM2 tokenizer, then times calibrate, prune (SparseGPT; Wanda with pruned-stream
statistics, the variant with matrix work; Wanda with the default dense statistics), reconstruct (block windows, two
epochs, the defaults) and a perplexity pass, with each stage's peak GPU memory and, from bench/flops.py, its
achieved TFLOP/s as a share of the bf16 matrix-product peak measured first. The 7B slice is extrapolated to 32
blocks. Writes gpu_check.json (keys calibrate_share_of_peak, prune_share_of_peak, reconstruct_share_of_peak) and
gpu_check.md.

    python3 bench/gpu_check.py --assets runs/gpu-assets --out bench/out [--tiny]   # --tiny: a quick run on any device
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate  # noqa: E402
from freelunch_cli.stages.evaluate import EvalConfig, evaluate  # noqa: E402
from freelunch_cli.stages.prune import PruneConfig, prune  # noqa: E402
from freelunch_cli.stages.reconstruct import ReconstructConfig, reconstruct  # noqa: E402
from freelunch_cli.workdir.directory import WorkDir  # noqa: E402

from flops import block_forward_flops, matmul_peak  # noqa: E402


def shape(
    hidden: int, intermediate: int, heads: int, kv_heads: int, blocks: int, samples: int, seqlen: int, full_blocks: int, **config
) -> dict:
    """A Llama shape to check: its config, the calibration size, and the block count to extrapolate to."""
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=blocks,
        samples=samples,
        seqlen=seqlen,
        full_blocks=full_blocks,
        **config,
    )


SHAPES = {
    "7b-slice": shape(4096, 11008, 32, 32, blocks=8, samples=128, seqlen=2048, full_blocks=32),
    "smollm2-135m": shape(576, 1536, 9, 3, blocks=30, samples=128, seqlen=512, full_blocks=30, tie_word_embeddings=True),
}
TINY = {"tiny": shape(256, 512, 4, 4, blocks=2, samples=8, seqlen=128, full_blocks=2)}


def build(folder: Path, shape: dict, tokenizer_dir: Path, device: torch.device):
    """A random-weight Llama of ``shape`` (bf16 weights, std 0.02) saved with the tokenizer; its config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "tie_word_embeddings",
    )
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, **{k: shape[k] for k in keys if k in shape})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return config


def timed(device: torch.device, fn) -> tuple[float, float, object]:
    """(seconds, peak GPU GiB, result) of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return time.perf_counter() - t0, peak, result


def check_shape(name: str, shape: dict, assets: Path, root: Path, device: torch.device, peak: float) -> dict:
    folder, work = root / f"{name}-model", WorkDir(root / f"{name}-work")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(work.root, ignore_errors=True)
    t0 = time.perf_counter()
    config = build(folder, shape, assets / "tokenizer", device)
    built = time.perf_counter() - t0
    data = assets / "data" / "wikitext-2-raw"
    samples, seqlen, n = shape["samples"], shape["seqlen"], shape["num_hidden_layers"]
    dev = str(device)
    fwd = block_forward_flops(config, samples * seqlen, seqlen)
    rows = {}

    def record(stage: str, seconds: float, gib: float, flops: float | None):
        rows[stage] = {"seconds": round(seconds, 2), "peak_gpu_gib": round(gib, 2)}
        if flops:
            rows[stage].update(tflops=round(flops / seconds / 1e12, 1), share_of_peak=round(flops / seconds / peak, 3))
        print(f"{name} {stage}: {rows[stage]}", flush=True)

    cal_cfg = CalibrateConfig(
        model=str(folder), data=str(data / "calib.txt"), samples=samples, seqlen=seqlen, allow_overlap=True, device=dev
    )
    s, g, cal = timed(device, lambda: calibrate(work, cal_cfg))
    record("calibrate", s, g, None)
    rows["calibrate"]["dense_pass_seconds"] = cal["seconds_dense_pass"]
    rows["calibrate"]["dense_pass_share_of_peak"] = round(n * fwd / cal["seconds_dense_pass"] / peak, 3)
    s, g, _ = timed(device, lambda: prune(work, PruneConfig(criterion="sparsegpt", device=dev), force=True))
    record("prune sparsegpt", s, g, None)
    rows["prune sparsegpt"]["seconds_per_block"] = round(s / n, 2)
    s, g, _ = timed(device, lambda: prune(work, PruneConfig(criterion="wanda", stats="sparse", device=dev), force=True))
    record("prune wanda --stats sparse", s, g, (2 * n - 1) * fwd)
    s, g, _ = timed(device, lambda: prune(work, PruneConfig(criterion="wanda", device=dev), force=True))
    record("prune wanda (defaults)", s, g, None)
    epochs, probe = 2, min(32, samples) * seqlen / (samples * seqlen)
    s, g, rc = timed(device, lambda: reconstruct(work, ReconstructConfig(window="block", device=dev)))
    record("reconstruct (block, 2 epochs)", s, g, n * fwd * (3 * epochs + 2 * probe))
    rows["reconstruct (block, 2 epochs)"]["window_seconds"] = rc["window_seconds"]
    ev = EvalConfig(ppl=[str(data / "heldout.txt")], seqlen=seqlen, limit_sequences=16, stage="reconstructed", device=dev)
    s, g, res = timed(device, lambda: evaluate(work, ev))
    record("perplexity (16 sequences)", s, g, None)
    scale = shape["full_blocks"] / n
    full = (
        rows["calibrate"]["seconds"]
        + rows["prune wanda (defaults)"]["seconds"]
        + rows["reconstruct (block, 2 epochs)"]["seconds"]
    ) * scale
    shutil.rmtree(work.root, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "shape": {k: v for k, v in shape.items()},
        "build_seconds": round(built, 1),
        "stages": rows,
        "ppl": res["results"][0]["ppl"],
        "extrapolated_blocks": shape["full_blocks"],
        "extrapolated_calibrate_wanda_reconstruct_minutes": round(full / 60, 2),
    }


def markdown(result: dict) -> str:
    lines = [
        f"GPU check on {result['device_name']} (torch {result['torch']}), bf16 matrix-product peak measured "
        f"{result['peak_tflops']:.0f} TFLOP/s; written by `bench/gpu_check.sh` on {result['date']}.",
        "",
    ]
    for name, shape in result["shapes"].items():
        lines += [
            f"**{name}** ({shape['shape']['num_hidden_layers']} blocks, hidden {shape['shape']['hidden_size']}, "
            f"{shape['shape']['samples']} x {shape['shape']['seqlen']} tokens): calibrate + Wanda + reconstruct "
            f"extrapolated to {shape['extrapolated_blocks']} blocks: {shape['extrapolated_calibrate_wanda_reconstruct_minutes']} min",
            "",
            "| stage | seconds | peak GPU GiB | TFLOP/s | share of peak |",
            "| --- | --- | --- | --- | --- |",
        ]
        for stage, row in shape["stages"].items():
            lines.append(
                f"| {stage} | {row['seconds']} | {row['peak_gpu_gib']} | {row.get('tflops', '-')} | "
                f"{row.get('share_of_peak', '-')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default="runs/gpu-assets")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--work", default="/tmp/freelunch-gpu-check")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", default=None, help="comma-separated shape names")
    ap.add_argument("--tiny", action="store_true", help="a two-block model on a few samples: checks the script, anywhere")
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, dtype)
    print(f"matrix-product peak: {peak / 1e12:.1f} TFLOP/s ({dtype})", flush=True)
    shapes = TINY if a.tiny else {k: v for k, v in SHAPES.items() if a.only is None or k in a.only.split(",")}
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "peak_tflops": peak / 1e12,
        "shapes": {},
    }
    root = Path(a.work)
    for name, shape in shapes.items():
        result["shapes"][name] = check_shape(name, shape, Path(a.assets), root, device, peak)
    first = next(iter(result["shapes"].values()))["stages"]
    result.update(
        calibrate_share_of_peak=first["calibrate"]["dense_pass_share_of_peak"],
        prune_share_of_peak=first["prune wanda --stats sparse"]["share_of_peak"],
        reconstruct_share_of_peak=first["reconstruct (block, 2 epochs)"]["share_of_peak"],
        sparsegpt_seconds_per_block=first["prune sparsegpt"]["seconds_per_block"],
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()

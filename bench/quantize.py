"""Sparse and 4-bit on SmolLM2-135M: round-to-nearest and quantization-aware local reconstruction, with and without
Wanda 50%, against llm-compressor's GPTQ W4A16 on the same calibration windows (issue: "Sparse and 4-bit").

    python bench/quantize.py [--out runs/quant-bench] [--llmc /tmp/llmc/bin/python] [--group-size 64]

Calibration: 128 x 512 tokens of calib.txt; perplexity: 40 x 512 tokens of held-out WikiText and of Tiny Shakespeare
(as the paper benchmark). Cells run in one work directory, one after another, each recorded in
bench/out/quantize.json as soon as it finishes (a rerun skips recorded cells); the table goes to bench/out/quantize.md,
the README's headline section and docs/results.md's. Group size 64: SmolLM2's hidden size, 576, is not a multiple of 128.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    HELDOUT,
    ROOT,
    SHAKESPEARE,
    calibrate_args,
    machine,
    markdown_table,
    run_stage,
    safetensors_bytes,
    write_json,
    write_section,
)

OUT = ROOT / "bench" / "out" / "quantize.json"


def evaluate(*where: str) -> dict:
    out = {}
    for name, path in (("wikitext", HELDOUT), ("shakespeare", SHAKESPEARE)):
        r = run_stage("eval", *where, "--ppl", str(path), "--seqlen", "512", "--limit-sequences", "40")["results"][0]
        out[name] = r["ppl"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quant-bench")
    ap.add_argument("--llmc", default="/tmp/llmc/bin/python", help="Python of an environment with llm-compressor")
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()
    work, g = a.out / "work", str(a.group_size)
    w = ("--work", str(work))
    done = json.loads(OUT.read_text())["cells"] if OUT.exists() else {}

    def record(name: str, **values) -> None:
        done[name] = values
        write_json(OUT, {"machine": machine(), "group_size": a.group_size, "cells": done})
        print(name, json.dumps(values), flush=True)

    def cell(name: str, stage_args: tuple, model: str, export: bool = True) -> None:
        if name in done:
            return
        s = run_stage(*stage_args, *w, "--keep-cache", "--force")
        sizes = {}
        if export:
            dest = a.out / f"ct-{name}"
            run_stage("export", *w, "--format", "compressed-tensors", "--out", str(dest), "--force")
            sizes["bytes"] = safetensors_bytes(dest)
        record(
            name, seconds=round(s["_wall"], 1), peak_rss_mib=round(s["_peak_rss_mib"]), **sizes, **evaluate(*w, "--stage", model)
        )

    if not (work / "manifest.json").exists() or "dense" not in done:
        s = run_stage(*calibrate_args(work, 128, 512), "--resume")
        dense_hf = a.out / "dense-hf"
        run_stage("export", *w, "--stage", "dense", "--out", str(dense_hf), "--force")
        run_stage("export", *w, "--stage", "dense", "--dtype", "bfloat16", "--out", str(a.out / "dense-hf-bf16"), "--force")
        record(
            "dense",
            seconds=round(s["_wall"], 1),
            peak_rss_mib=round(s["_peak_rss_mib"]),
            bytes=safetensors_bytes(dense_hf),
            bytes_bf16=safetensors_bytes(a.out / "dense-hf-bf16"),
            **evaluate(*w, "--stage", "dense"),
        )
    quant = ("quantize", "--scheme", "w4a16", "--group-size", g)
    cell("w4a16-rtn", (*quant, "--from", "dense", "--steps", "0"), "quantized")
    cell("w4a16-qar", (*quant, "--from", "dense"), "quantized")
    llmc(a, work, "gptq-dense", a.out / "dense-hf", done, record)
    if "wanda" not in done:
        s = run_stage("prune", *w, "--criterion", "wanda", "--sparsity", "0.5", "--force")
        run_stage("export", *w, "--stage", "pruned", "--out", str(a.out / "pruned-hf"), "--force")
        record("wanda", seconds=round(s["_wall"], 1), peak_rss_mib=round(s["_peak_rss_mib"]), **evaluate(*w, "--stage", "pruned"))
    cell("wanda+w4a16-rtn", (*quant, "--from", "pruned", "--steps", "0"), "quantized")
    cell("wanda+w4a16-qar", (*quant, "--from", "pruned"), "quantized")
    cell("wanda+reconstruct", ("reconstruct",), "reconstructed", export=False)
    llmc(a, work, "wanda+gptq", a.out / "pruned-hf", done, record)
    cell("wanda+reconstruct+w4a16-qar", (*quant, "--from", "reconstructed"), "quantized")
    cell("wanda+reconstruct+w4a16-qar-ls", (*quant, "--from", "reconstructed", "--learn-scales"), "quantized")
    table = results_table(done)
    (ROOT / "bench" / "out" / "quantize.md").write_text(table + "\n")
    stamp = (
        f"Written by `python bench/quantize.py` on {time.strftime('%Y-%m-%d %H:%M')} (2 CPU cores), group size {a.group_size}."
    )
    write_section(ROOT / "README.md", "quantize-headline", f"{stamp}\n\n{table}")
    write_section(ROOT / "docs" / "results.md", "quantize", f"{stamp}\n\n{table}")
    print(table)


def llmc(a, work: Path, name: str, source: Path, done: dict, record) -> None:
    """llm-compressor's GPTQ on ``source`` (its own environment), then our perplexity protocol on its checkpoint."""
    if name in done or not Path(a.llmc).exists():
        return
    dest = a.out / name
    t0 = time.time()
    proc = subprocess.run(
        [a.llmc, str(ROOT / "bench" / "llmc_gptq.py"), str(source), str(work), str(dest), str(a.group_size)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return
    peer = json.loads(proc.stdout.strip().splitlines()[-1])
    record(
        name,
        seconds=peer["oneshot_s"],
        wall_s=round(time.time() - t0, 1),
        peak_rss_mib=peer["peak_rss_mib"],
        bytes=safetensors_bytes(dest),
        sparsity=block_sparsity(dest),
        **evaluate("--model", str(dest)),
    )


def block_sparsity(folder: Path) -> float:
    """Share of zero weights of the decoder blocks' matrices of a compressed-tensors checkpoint, unpacked."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    lm = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))
    zeros = total = 0
    for name, p in lm.named_parameters():
        if ".layers." in name and p.dim() == 2:
            zeros += int((p == 0).sum())
            total += p.numel()
    return round(zeros / total, 4)


LABELS = [
    ("dense", "dense (float32)"),
    ("w4a16-rtn", "W4A16 round-to-nearest"),
    ("w4a16-qar", "W4A16 quantization-aware reconstruction"),
    ("gptq-dense", "W4A16 llm-compressor GPTQ"),
    ("wanda", "Wanda 50%"),
    ("wanda+reconstruct", "Wanda 50% + reconstruct"),
    ("wanda+w4a16-rtn", "Wanda 50% + W4A16 round-to-nearest"),
    ("wanda+w4a16-qar", "Wanda 50% + W4A16 quantization-aware reconstruction"),
    ("wanda+gptq", "Wanda 50% + llm-compressor GPTQ W4A16"),
    ("wanda+reconstruct+w4a16-qar", "Wanda 50% + reconstruct + W4A16 quantization-aware reconstruction"),
    ("wanda+reconstruct+w4a16-qar-ls", "Wanda 50% + reconstruct + W4A16 quantization-aware reconstruction, learned scales"),
]


def results_table(done: dict) -> str:
    rows = []
    for key, label in LABELS:
        r = done.get(key)
        if r is None:
            continue
        size = f"{r['bytes'] / 1e6:.0f}" if "bytes" in r else "-"
        rows.append(
            [label, size, f"{r['wikitext']:.2f}", f"{r['shakespeare']:.2f}", f"{r['seconds']:.0f}", f"{r['peak_rss_mib']:,}"]
        )
    return markdown_table(
        ["model", "size on disk (MB)", "WikiText ppl", "Shakespeare ppl", "stage seconds", "peak RSS (MiB)"], rows
    )


if __name__ == "__main__":
    main()

"""Peak memory and time of calibrate + prune + reconstruct as the model grows: it must stay one window.

    python bench/scale.py [--blocks 4,8,16,32] [--hidden 1024] [--samples 16] [--seqlen 256]

Builds random Llama models (safetensors, written block by block so the builder never holds the whole
model either), runs the three stages through the CLI, and records wall time and the peak resident memory
of each stage's process. Writes bench/out/scale.md and scale.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from common import CALIB, ROOT, calibrate_args, machine, markdown_table, run_stage, write_json  # noqa: E402


def build_random_llama(folder: Path, blocks: int, hidden: int, seed: int = 0) -> int:
    """A random Llama checkpoint in shards of one block each; returns its parameter count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [CALIB.read_text()], trainers.BpeTrainer(vocab_size=2048, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="Ġ").save_pretrained(folder)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=blocks,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    cfg.save_pretrained(folder)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in meta.state_dict().items()}
    weight_map, total = {}, 0
    groups = [[k for k in shapes if not k.startswith("model.layers.")]] + [
        [k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(blocks)
    ]
    for n, keys in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for k in keys:
            shape = shapes[k]
            tensors[k] = (
                torch.ones(shape) if k.endswith("norm.weight") else torch.randn(shape, generator=g) * (1.0 / shape[-1]) ** 0.5
            )
            weight_map[k] = name
            total += tensors[k].numel()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="4,8,16,32")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--root", default=str(ROOT / "runs" / "bench-scale"))
    a = ap.parse_args()
    root = Path(a.root)
    rows, records = [], []
    for n in [int(x) for x in a.blocks.split(",")]:
        model, work = root / f"model-{n}", root / f"work-{n}"
        params = build_random_llama(model, n, a.hidden) if not (model / "config.json").exists() else None
        cal = run_stage(*calibrate_args(work, a.samples, a.seqlen, model), "--resume", "--device", "cpu")
        pr = run_stage("prune", "--work", str(work), "--criterion", "wanda", "--sparsity", "0.5", "--resume", "--device", "cpu")
        rc = run_stage("reconstruct", "--work", str(work), "--window", "block", "--resume", "--device", "cpu")
        rec = {
            "blocks": n,
            "hidden": a.hidden,
            "params": params,
            **{f"{k}_seconds": round(v["_wall"], 1) for k, v in (("calibrate", cal), ("prune", pr), ("reconstruct", rc))},
            **{f"{k}_peak_mib": round(v["_peak_rss_mib"]) for k, v in (("calibrate", cal), ("prune", pr), ("reconstruct", rc))},
        }
        records.append(rec)
        rows.append(
            [
                n,
                f"{(params or 0) / 1e6:.0f}M" if params else "-",
                rec["calibrate_seconds"],
                rec["calibrate_peak_mib"],
                rec["prune_seconds"],
                rec["prune_peak_mib"],
                rec["reconstruct_seconds"],
                rec["reconstruct_peak_mib"],
            ]
        )
        print(rows[-1], flush=True)
    table = markdown_table(
        [
            "blocks",
            "params",
            "calibrate s",
            "calibrate peak MiB",
            "prune s",
            "prune peak MiB",
            "reconstruct s",
            "reconstruct peak MiB",
        ],
        rows,
    )
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.md").write_text(
        f"Random Llama, hidden {a.hidden}, {a.samples} x {a.seqlen} calibration tokens, CPU.\n\n{table}\n\n{machine()}\n"
    )
    write_json(out / "scale.json", {"machine": machine(), "cells": records})
    print(table)


if __name__ == "__main__":
    main()

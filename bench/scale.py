"""Peak memory and time of calibrate + prune + reconstruct as the model grows: it must stay one window.

    python bench/scale.py [--blocks 4,8,16,32] [--hidden 1024] [--samples 16] [--seqlen 256]
    python bench/scale.py --two-processes [--blocks 8]    # one process against two, and the 70B estimate

Builds random Llama models (safetensors, written block by block so the builder never holds the whole
model either), runs the three stages through the CLI, and records wall time and the peak resident memory
of each stage's process. Writes bench/out/scale.md and scale.json.

``--two-processes`` runs prune (``--shard``), reconstruct (``--shard``) and retrain (FSDP2 under torchrun, full and
masked-LoRA) on one model in one process and in two at once (gloo on the CPU), records wall time and the largest
process's peak resident memory, and adds the estimate per GPU for a 70B model on 8 x 80 GB (``training.memory``)
with its wall time from the FLOPs of a step. Writes bench/out/scale-processes.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
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


def run_together(commands: list[list[str]]) -> dict:
    """Start the commands at once; wall seconds until the last ends and the largest peak RSS (MiB) of any process
    (``wait4`` counts a process and the children it reaped: torchrun's ranks)."""
    t0 = time.time()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV) for c in commands]
    peak = 0.0
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{' '.join(p.args)} failed:\n{p.stderr.read()[-2000:]}")
        peak = max(peak, usage.ru_maxrss / 1024)
    return {"seconds": round(time.time() - t0, 1), "peak_mib": round(peak)}


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FREELUNCH = [sys.executable, "-m", "freelunch_cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "freelunch_cli"]

LLAMA_70B = {"hidden": 8192, "inter": 28672, "kv": 1024, "blocks": 80, "vocab": 128256}  # Llama-3-70B's shapes
H100_MEMORY = 81559 * 2**20  # what torch reports for an 80 GB H100
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an 80 GB H100 (SXM)
ASSUMED_MFU = 0.4  # share of that peak a sharded training step reaches: an assumption, stated in the table


def estimate_70b(batch: int = 8, seqlen: int = 2048, gpus: int = 8, rank: int = 16) -> list[dict]:
    """Memory per GPU of FSDP retraining of a 70B model (full and masked-LoRA, bf16 compute, recomputation) and the
    wall time of one million tokens at ``ASSUMED_MFU``: 6 FLOPs per parameter and token for full training (forward
    2, backward 4), 4 with frozen weights (no weight gradients), plus 2 for recomputing the forward."""
    from freelunch_cli.training.memory import processes_needed, retrain_estimate

    m = LLAMA_70B
    h = m["hidden"]
    attn = 2 * h * h + 2 * h * m["kv"]
    mlp = 3 * h * m["inter"]
    nums = {"params": attn + mlp + 2 * h, "hidden": h, "inter": m["inter"], "kv": m["kv"]}
    rest = 2 * m["vocab"] * h + h
    total = nums["params"] * m["blocks"] + rest
    linears = [(h, h), (m["kv"], h), (m["kv"], h), (h, h), (m["inter"], h), (m["inter"], h), (h, m["inter"])]
    adapters = m["blocks"] * sum(rank * (o + i) for o, i in linears)
    masked = m["blocks"] * (attn + mlp)
    rows = []
    for variant, trainable, masks, flops in (("full", total, masked, 6 + 2), ("masked-lora", adapters, masked, 4 + 2)):

        def estimate_for(world, trainable=trainable, masks=masks, variant=variant):
            return retrain_estimate(
                nums,
                m["blocks"],
                rest,
                m["vocab"],
                trainable,
                masks,
                batch,
                seqlen,
                world,
                2,
                True,
                512,
                trains_rest=variant == "full",
                masks_gathered=variant == "masked-lora",
            )

        est = estimate_for(gpus)
        seconds = flops * total * 1e6 / (gpus * H100_BF16_PEAK * ASSUMED_MFU)
        needed = processes_needed(estimate_for, H100_MEMORY)
        rows.append(
            {
                "variant": variant,
                "params": total,
                "trainable": trainable,
                **est,
                "gpus_needed": needed,
                "seconds_per_million_tokens": seconds,
            }
        )
    return rows


def retrain_estimate_mib(work: Path, peft: str, size: int) -> int:
    """What ``retrain`` estimates per process (live tensors only: no interpreter, libraries or allocator slack)."""
    from freelunch_cli.configs.stage_configs import RetrainConfig
    from freelunch_cli.core.console import Reporter
    from freelunch_cli.stages.retrain import check_memory
    from freelunch_cli.training.fsdp import World
    from freelunch_cli.workdir.directory import WorkDir

    cfg = RetrainConfig(peft=peft, batch_size=4, max_memory="1TiB").resolved("pruned")
    world = None if size == 1 else World(0, size, 0)
    est = check_memory(WorkDir(work), cfg, "pruned", world, "cpu", torch.float32, Reporter(quiet=True))
    return round(est["total"] / 2**20)


def two_processes(root: Path, blocks: int, hidden: int, samples: int, seqlen: int, steps: int) -> None:
    """One process against two on one model: prune, reconstruct and retrain; and the 70B estimate."""
    model, base = root / f"model-{blocks}", root / f"procs-{blocks}"
    if not (model / "config.json").exists():
        build_random_llama(model, blocks, hidden)
    calibrated = base / "calibrated"
    if not calibrated.exists():
        run_stage(*calibrate_args(calibrated, samples, seqlen, model), "--device", "cpu")
    cells, records = [], []

    def work(name: str, src: Path) -> str:
        dst = base / name
        if dst.exists():
            subprocess.run(["rm", "-rf", str(dst)], check=True)
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
        return str(dst)

    prune = ["prune", "--criterion", "wanda", "--sparsity", "0.5", "--device", "cpu", "--quiet"]
    one = work("prune-1", calibrated)
    cells.append(("prune (Wanda 50%)", run_together([[*FREELUNCH, *prune, "--work", one]])))
    two = work("prune-2", calibrated)
    subprocess.run([*FREELUNCH, *prune, "--work", two, "--prepare"], check=True, env=ENV)
    cells[-1] += (run_together([[*FREELUNCH, *prune, "--work", two, "--shard", f"{i}/2"] for i in range(2)]),)
    recon = ["reconstruct", "--window", "block", "--epochs", "1", "--device", "cpu", "--quiet"]
    one_r, two_r = work("recon-1", Path(one)), work("recon-2", Path(one))
    cells.append(("reconstruct (block windows, 1 epoch)", run_together([[*FREELUNCH, *recon, "--work", one_r]])))
    subprocess.run([*FREELUNCH, *recon, "--work", two_r, "--prepare"], check=True, env=ENV)
    cells[-1] += (run_together([[*FREELUNCH, *recon, "--work", two_r, "--shard", f"{i}/2"] for i in range(2)]),)
    for peft in ("full", "masked-lora"):
        retrain = ["retrain", "--peft", peft, "--steps", str(steps), "--batch-size", "4", "--device", "cpu", "--quiet"]
        a, b = work(f"retrain-{peft}-1", Path(one)), work(f"retrain-{peft}-2", Path(one))
        label = f"retrain {peft} ({steps} steps of 4 x {seqlen} tokens)"
        single, pair = run_together([[*FREELUNCH, *retrain, "--work", a]]), run_together([[*TORCHRUN, *retrain, "--work", b]])
        single["estimate_mib"], pair["estimate_mib"] = (retrain_estimate_mib(Path(a), peft, size) for size in (1, 2))
        cells.append((label, single, pair))
    rows = []
    for label, single, pair in cells:
        rows.append(
            [
                label,
                single["seconds"],
                single["peak_mib"],
                single.get("estimate_mib", "-"),
                pair["seconds"],
                pair["peak_mib"],
                pair.get("estimate_mib", "-"),
            ]
        )
        records.append({"stage": label, "one_process": single, "two_processes": pair})
        print(rows[-1], flush=True)
    header = ["stage", "1 process s", "peak MiB", "estimate MiB", "2 processes s", "largest process peak MiB", "estimate MiB"]
    table = markdown_table(header, rows)
    big = estimate_70b()
    gib = 2**30
    big_rows = [
        [
            r["variant"],
            f"{r['trainable'] / 1e9:.2f}B",
            f"{r['weights'] / gib:.1f}",
            f"{r['grads_adam'] / gib:.1f}",
            f"{r['masks'] / gib:.1f}",
            f"{(r['gathered'] + r['activations'] + r['head']) / gib:.1f}",
            f"{r['total'] / gib:.1f}",
            r["gpus_needed"],
            f"{r['seconds_per_million_tokens']:.0f}",
        ]
        for r in big
    ]
    big_table = markdown_table(
        [
            "70B on 8 x 80 GB",
            "trainable",
            "weights GiB",
            "grads + AdamW GiB",
            "masks GiB",
            "gathered + activations GiB",
            "total per GPU GiB",
            "80 GB GPUs needed",
            "s per 1M tokens (8 GPUs)",
        ],
        big_rows,
    )
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    note = (
        f"Random Llama, {blocks} blocks, hidden {hidden}, {samples} x {seqlen} calibration tokens, CPU (2 cores). Every "
        f"process runs one thread (OMP_NUM_THREADS=1): one process uses one core, two use both (gloo between them for "
        f"retraining). The point is memory per process and equal results; CPU times say little about GPUs. Estimates "
        f"count live tensors only; a process's peak also holds the interpreter and libraries (about 700 MiB, prune's "
        f"peak) and what the allocator keeps of freed memory."
    )
    assumption = (
        f"Estimate (`training.memory.retrain_estimate`): Llama-3-70B shapes, 8 GPUs, a batch of 8 x 2048 tokens, bf16 "
        f"compute with float32 master weights, --grad-checkpoint; time at {ASSUMED_MFU:.0%} of the H100's "
        f"{H100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 peak (assumed, not measured: no GPU in this session)."
    )
    (out / "scale-processes.md").write_text(f"{note}\n\n{table}\n\n{assumption}\n\n{big_table}\n\n{machine()}\n")
    write_json(out / "scale-processes.json", {"machine": machine(), "cells": records, "estimate_70b": big})
    print(table)
    print(big_table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--two-processes", action="store_true", help="one process against two, and the 70B estimate")
    ap.add_argument("--steps", type=int, default=4, help="retraining steps with --two-processes")
    ap.add_argument("--blocks", default="4,8,16,32")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--root", default=str(ROOT / "runs" / "bench-scale"))
    a = ap.parse_args()
    root = Path(a.root)
    if a.two_processes:
        two_processes(root, int(a.blocks.split(",")[0]), a.hidden, a.samples, a.seqlen, a.steps)
        return
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

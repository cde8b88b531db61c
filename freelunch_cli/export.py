"""Stage 5: a standard Hugging Face folder (sharded safetensors, zeros stored) and a model card."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from freelunch_cli import __version__
from freelunch_cli.console import Reporter
from freelunch_cli.errors import FreelunchError
from freelunch_cli.faults import checkpoint
from freelunch_cli.runtime import dtype_name, parse_dtype
from freelunch_cli.source import meta_model
from freelunch_cli.arch import find_arch
from freelunch_cli.storage import load_tensors, read_json, save_tensors_atomic, write_bytes_atomic, write_json_atomic
from freelunch_cli.workdir import MODEL_STAGES, WorkDir


def parse_size(text: str) -> int:
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise FreelunchError(f"cannot read size {text!r}: use e.g. 2GB, 500MB") from None


def export(work: WorkDir, out: Path, stage: str = "latest", dtype: str | None = None, max_shard_size: str = "2GB",
           force: bool = False, rep: Reporter | None = None) -> dict:
    rep = rep or Reporter(quiet=True)
    out = Path(out)
    stage = work.latest_model_stage() if stage == "latest" else stage
    if stage not in MODEL_STAGES:
        raise FreelunchError(f"--stage must be latest or one of {', '.join(MODEL_STAGES)}")
    if stage == "reconstructed":
        work.latest_model_stage()  # refuses an unfinished reconstruction, naming the missing windows
    target = parse_dtype(dtype) if dtype else None
    limit = parse_size(max_shard_size)
    if out.exists() and any(out.iterdir()) and not force:
        raise FreelunchError(f"{out} exists and is not empty; pass --force to overwrite it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".freelunch-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FreelunchError(f"cannot write to {out}: {e.strerror or e}") from None
    t0 = time.time()
    dense = work.model_dir("dense")
    config = AutoConfig.from_pretrained(dense)
    arch = find_arch(meta_model(config), config)
    parts = [("rest", work.check_file(dense / "rest.safetensors"))]
    parts += [(i, work.stage_block_path(stage, i)) for i in range(arch.num_blocks)]

    # Plan shards from the headers: consecutive parts up to the size limit.
    from safetensors import safe_open

    sizes = []
    for _, path in parts:
        with safe_open(str(path), framework="pt") as f:
            n = 0
            for k in f.keys():
                sl = f.get_slice(k)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                elt = target.itemsize if target is not None and sl.get_dtype() in ("F32", "F16", "BF16") else _itemsize(sl.get_dtype())
                n += numel * elt
            sizes.append(n)
    shards, cur, cur_size = [], [], 0
    for part, size in zip(parts, sizes):
        if cur and cur_size + size > limit:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(part)
        cur_size += size
    shards.append(cur)

    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    weight_map, total, zeros, numel = {}, 0, 0, 0
    with rep.progress("export", total=len(parts)) as bar:
        for s, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for part, path in shard:
                prefix = "" if part == "rest" else arch.block_prefix(part)
                for k, v in load_tensors(path).items():
                    if target is not None and v.is_floating_point():
                        v = v.to(target)
                    tensors[prefix + k] = v
                    if part != "rest" and v.dim() == 2:
                        zeros += int((v == 0).sum())
                        numel += v.numel()
                bar.advance()
            save_tensors_atomic(out / name, tensors, {"format": "pt"})
            checkpoint("export.shard")
            for k, v in tensors.items():
                weight_map[k] = name
                total += v.numel() * v.element_size()
    if len(shards) > 1:
        write_json_atomic(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})

    if target is not None:
        config.dtype = dtype_name(target)
    config.save_pretrained(out)
    for f in dense.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    card = model_card(work, stage, zeros / max(numel, 1))
    write_bytes_atomic(out / "README.md", card.encode())
    summary = {"out": str(out), "stage": stage, "shards": len(shards), "bytes": total, "block_sparsity": zeros / max(numel, 1),
               "seconds": round(time.time() - t0, 2)}
    rep.summary(f"exported the {stage} model to {out} ({len(shards)} shard(s), block weight sparsity {summary['block_sparsity']:.4f})", summary)
    return summary


def _itemsize(st_dtype: str) -> int:
    return {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(st_dtype, 4)


def model_card(work: WorkDir, stage: str, sparsity: float) -> str:
    """A short README recording where the model came from and how it was made."""
    calib = work.stage("calibrate")
    prune = work.stage("prune") if stage != "dense" else None
    recon = work.stage("reconstruct") if stage == "reconstructed" else None
    source = calib.signature.get("model")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [sparse, pruned, freelunch]",
        "---",
        "",
        f"# Sparse model made with freelunch {__version__}",
        "",
        f"- Source model: `{source}`" + (f" (GGUF `{calib.signature['gguf_file']}`)" if calib.signature.get("gguf_file") else ""),
        f"- Calibration: {calib.summary['samples']} x {calib.summary['seqlen']} tokens from `{calib.signature['data']}`, seed {calib.signature['seed']}",
    ]
    if prune is not None:
        lines.append(f"- Pruning: {prune.summary['criterion']}, {prune.summary['pattern']}; achieved sparsity of block linear weights {sparsity:.4f}")
    else:
        lines.append("- Pruning: none (dense model)")
    if recon is not None:
        c = recon.summary["config"]
        lines.append(f"- Local reconstruction: window {c['window']}, lr {c['lr']}, {c['epochs']} epoch(s), batch {c['batch_size']}, loss {c['loss']}")
    else:
        lines.append("- Local reconstruction: none")
    evals = sorted((work.root / "eval").glob("*.json")) if (work.root / "eval").is_dir() else []
    runs = {st: work.stage(name).run_id for st, name in (("dense", "calibrate"), ("pruned", "prune"), ("reconstructed", "reconstruct")) if work.stage(name)}
    rows = [r for r in (read_json(p) for p in evals) if r.get("key", {}).get("run") == runs.get(r.get("model"))]
    if rows:
        lines += ["", "## Metrics", "", "| model | data | seqlen | tokens | perplexity |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['data']} | {r['seqlen']} | {r['tokens']} | {r['ppl']:.3f} |" for r in rows if "ppl" in r]
    lines += ["", "Pruned weights are stored as zeros; the model loads with plain `transformers`.", ""]
    return "\n".join(lines)

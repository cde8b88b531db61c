"""Stage 5: a standard Hugging Face folder (sharded safetensors, zeros stored) and a model card; with ``--format
compressed-tensors``, the quantized model packed by the compressed-tensors library (``quantization.compressed``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from freelunch_cli import __version__
from freelunch_cli.configs.stage_configs import ExportConfig, QuantizeConfig
from freelunch_cli.core.console import Reporter
from freelunch_cli.core.device import dtype_name, parse_dtype
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.kill_points import kill_point
from freelunch_cli.core.units import parse_size
from freelunch_cli.engine.models import require_model
from freelunch_cli.model.arch import find_arch
from freelunch_cli.model.build import meta_model
from freelunch_cli.model.source import trusts_remote_code, work_config
from freelunch_cli.quantization.compressed import ct_config, pack_block
from freelunch_cli.workdir.directory import STAGE_OF, StageRecord, WorkDir
from freelunch_cli.workdir.files import (
    load_tensors,
    read_json,
    save_pretrained_atomic,
    save_tensors_atomic,
    sha256_file,
    tensor_names,
    write_bytes_atomic,
    write_json_atomic,
)

MARKER = ".freelunch-export.json"  # in the output folder: what was exported, and which shards are written


def export(work: WorkDir, cfg: ExportConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False) -> dict:
    """Write the model of ``cfg.stage`` as a Hugging Face folder in ``cfg.out`` (safetensors shards holding the zeros,
    config, tokenizer, model card); ``resume`` keeps the shards an interrupted export wrote. Returns the summary.

    Raises FreelunchError for an unfinished model, a non-empty ``out`` without ``force``/``resume``, or an unwritable one.
    """
    rep = rep or Reporter(quiet=True)
    cfg.validate()
    out = Path(cfg.out)
    stage = require_model(work, cfg.stage)
    packed = cfg.format == "compressed-tensors"
    if packed and stage != "quantized":
        raise FreelunchError(
            f"--format compressed-tensors packs a quantized model, but the {stage} model is not one; run "
            f"`freelunch quantize --work {work.root}` first"
        )
    scheme = _scheme_of(work.stage("quantize")) if packed else None
    target = parse_dtype(cfg.dtype) if cfg.dtype else None
    limit = parse_size(cfg.max_shard_size, "--max-shard-size")
    signature = cfg.signature(str(work.root.resolve()), stage, work.stage(STAGE_OF[stage]).run_id)
    marker = _read_marker(out)
    if not force and _finished(out, marker, signature):  # the same export, finished: a rerun is a no-op
        rep.summary(f"the {stage} model is already exported to {out} with these options", marker["summary"])
        return marker["summary"]
    resuming = resume and marker is not None and marker.get("signature") == signature
    if resume and marker is not None and not resuming:
        raise FreelunchError(f"{out} holds an export of another model or with other options; use --force to overwrite it")
    if out.exists() and any(out.iterdir()) and not (force or resuming):
        hint = "--resume to finish it or " if marker is not None else ""
        raise FreelunchError(f"{out} exists and is not empty; pass {hint}--force to overwrite it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".freelunch-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FreelunchError(f"cannot write to {out}: {e.strerror or e}") from None
    t0 = time.time()
    dense = work.model_dir("dense")
    config = work_config(work)
    lm = meta_model(config, trusts_remote_code(work))
    arch = find_arch(lm, config)
    parts = [("rest", work.rest_path(stage))]
    parts += [(i, work.model_block_path(stage, i)) for i in range(arch.num_blocks)]
    ignore = _unquantized_linears(work, lm, arch) if packed else []  # the quantization_config says exactly these
    if packed and not scheme.symmetric:
        rep.warn(ASYMMETRIC_LOAD)
    shards = plan_shards(parts, target, limit)
    names = [
        "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        for s in range(len(shards))
    ]
    done = marker["shards"] if resuming else {}
    if not resuming:
        for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            old.unlink()
    write_json_atomic(out / MARKER, {"signature": signature, "shards": done, "status": "running"})
    with rep.progress("export", total=len(parts)) as bar:
        for name, shard in zip(names, shards):
            rec = done.get(name)
            if rec is not None and (out / name).exists() and sha256_file(out / name).sha256 == rec["sha256"]:
                bar.advance(len(shard))
                continue
            tensors, zeros, numel = {}, 0, 0
            for part, path in shard:
                prefix = "" if part == "rest" else arch.block_prefix(part)
                state = load_tensors(path)
                if part != "rest":
                    for v in state.values():
                        if v.dim() >= 2 and v.is_floating_point():  # block weights, experts' 3-D ones too
                            zeros += int((v == 0).sum())
                            numel += v.numel()
                    if packed:
                        state = pack_block(state, load_tensors(work.check_file(work.qparams_path(part))), scheme)
                for k, v in state.items():
                    if target is not None and v.is_floating_point():
                        v = v.to(target)
                        if not bool(torch.isfinite(v).all()):
                            raise FreelunchError(
                                f"{prefix + k} overflows --dtype {dtype_name(target)} (values up to "
                                f"{float(state[k].abs().max()):.4g}; it holds up to {torch.finfo(target).max:.4g}): export "
                                f"without --dtype or with a wider one"
                            )
                    tensors[prefix + k] = v
                bar.advance()
            info = save_tensors_atomic(out / name, tensors, {"format": "pt"})
            done[name] = {
                **info.as_dict(),
                "keys": sorted(tensors),
                "zeros": zeros,
                "numel": numel,
                "bytes": sum(v.numel() * v.element_size() for v in tensors.values()),
            }
            write_json_atomic(out / MARKER, {"signature": signature, "shards": done, "status": "running"})
            kill_point("export.shard")
    total = sum(done[n]["bytes"] for n in names)
    if len(shards) > 1:
        weight_map = {k: n for n in names for k in done[n]["keys"]}
        write_json_atomic(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    sparsity = sum(done[n]["zeros"] for n in names) / max(sum(done[n]["numel"] for n in names), 1)
    if target is not None:
        config.dtype = dtype_name(target)
    save_pretrained_atomic(config, out)
    if packed:  # the quantization_config in config.json, written by the library
        from compressed_tensors.compressors import ModelCompressor

        ModelCompressor(quantization_config=ct_config(scheme, ignore=ignore)).update_config(str(out))
    for f in dense.iterdir():  # tokenizer files and the model's own code
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json" and not f.name.startswith("."):
            write_bytes_atomic(out / f.name, f.read_bytes())
    write_bytes_atomic(out / "README.md", model_card(work, stage, sparsity, cfg.format).encode())
    summary = {
        "out": str(out),
        "stage": stage,
        "shards": len(shards),
        "bytes": total,
        "block_sparsity": sparsity,
        "format": cfg.format,
        "seconds": round(time.time() - t0, 2),
    }
    for name in names:  # as finished: a rerun trusts a shard whose size and modification time are these
        done[name]["mtime_ns"] = (out / name).stat().st_mtime_ns
    files = {f.name: f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != MARKER}  # config, tokenizer, card
    marker = {"signature": signature, "shards": done, "files": files, "status": "done", "summary": summary}
    write_json_atomic(out / MARKER, marker)
    rep.summary(
        f"exported the {stage} model to {out} as {cfg.format} ({len(shards)} shard(s), {total / 1e6:.1f} MB, "
        f"block weight sparsity {sparsity:.4f})",
        summary,
    )
    return summary


def _finished(out: Path, marker: dict | None, signature: dict) -> bool:
    """Whether ``out`` holds a finished export with ``signature`` whose files are all still there with their sizes, and
    whose shards are as written (size, then the hash where the modification time changed)."""
    if marker is None or marker.get("status") != "done" or marker.get("signature") != signature or "summary" not in marker:
        return False
    for name, size in marker.get("files", {}).items():
        if not (out / name).is_file() or (out / name).stat().st_size != size:
            return False
    for name, rec in marker["shards"].items():
        path = out / name
        if not path.exists() or path.stat().st_size != rec["size"]:
            return False
        if path.stat().st_mtime_ns != rec.get("mtime_ns") and sha256_file(path).sha256 != rec["sha256"]:
            return False
    return True


ASYMMETRIC_LOAD = (
    "an asymmetric scheme's zero points are packed eight (4-bit) or four (8-bit) per int32 along the output rows, as "
    "the compressed-tensors library writes them and vLLM reads them; transformers 5 sizes them unpacked when it loads "
    "the folder compressed, so load it there with AutoModelForCausalLM.from_pretrained(folder, "
    "quantization_config=CompressedTensorsConfig(dequantize=True))"
)


def _unquantized_linears(work: WorkDir, lm, arch) -> list[str]:
    """The linear layers of the model (checkpoint names) that the packed export stores as float weights: the head,
    and any other linear outside the blocks (OPT-350m's project_in/project_out) or not quantized in them."""
    from torch import nn

    quantized = {
        arch.block_prefix(i) + k.removesuffix(".weight_scale")
        for i in range(arch.num_blocks)
        for k in tensor_names(work.check_file(work.qparams_path(i)))
        if k.endswith(".weight_scale")
    }
    return sorted(name for name, m in lm.named_modules() if isinstance(m, nn.Linear) and name not in quantized)


def _read_marker(out: Path) -> dict | None:
    try:
        return read_json(out / MARKER) if (out / MARKER).exists() else None
    except FreelunchError:
        return None


def plan_shards(parts, target, limit: int) -> list[list]:
    """Consecutive parts grouped up to ``limit`` bytes (sizes read from the safetensors headers)."""
    from safetensors import safe_open

    shards, cur, cur_size = [], [], 0
    for part, path in parts:
        size = 0
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                floating = sl.get_dtype() in ("F32", "F16", "BF16", "F64")
                size += numel * (target.itemsize if target is not None and floating else _itemsize(sl.get_dtype()))
        if cur and cur_size + size > limit:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append((part, path))
        cur_size += size
    shards.append(cur)
    return shards


def _itemsize(st_dtype: str) -> int:
    return {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(st_dtype, 4)


def _scheme_of(quantize: StageRecord):
    """The quantization scheme a quantize stage recorded in its signature."""
    sig = quantize.signature
    return QuantizeConfig(scheme=sig["scheme"], group_size=sig["group_size"], symmetric=sig["symmetric"]).quant_scheme()


def model_card(work: WorkDir, stage: str, sparsity: float, fmt: str = "hf") -> str:
    """A short README recording where the model came from and how it was made."""
    calib = work.stage("calibrate")
    steps = work.lineage(stage)
    prune, recon, retrain = steps.get("prune"), steps.get("reconstruct"), steps.get("retrain")
    quant = steps.get("quantize")
    kinds = (["sparse"] if prune is not None else []) + (["quantized"] if quant is not None else []) or ["fine-tuned"]
    tags = (
        (["sparse", "pruned"] if prune is not None else [])
        + (["quantized", quant.signature["scheme"]] if quant is not None else [])
        + (["compressed-tensors"] if fmt == "compressed-tensors" else [])
        + ["freelunch"]
    )
    source = calib.signature.get("model")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [" + ", ".join(tags) + "]",
        "---",
        "",
        f"# {' and '.join(kinds).capitalize()} model made with freelunch {__version__}",
        "",
        f"- Source model: `{source}`" + (f" (GGUF `{calib.signature['gguf_file']}`)" if calib.signature.get("gguf_file") else ""),
        f"- Calibration: {calib.summary['samples']} x {calib.summary['seqlen']} tokens from `{calib.signature['data']}`, seed {calib.signature['seed']}",
    ]
    pruning = (
        f"{prune.summary['criterion']}, {prune.summary['pattern']}; achieved sparsity of block linear weights {sparsity:.4f}"
        if prune is not None
        else "none (dense model)"
    )
    lines.append(f"- Pruning: {pruning}")
    c = recon.summary["config"] if recon is not None else {}
    reconstruction = (
        f"window {c['window']}, lr {c['lr']}, {c['epochs']} epoch(s), batch {c['batch_size']}, loss {c['loss']}"
        if recon is not None
        else "none"
    )
    lines.append(f"- Local reconstruction: {reconstruction}")
    if retrain is not None:
        c = retrain.summary["config"]
        kind = "Fine-tuning of the dense model" if prune is None else "Global retraining"
        lines.append(
            f"- {kind} ({c.get('peft') or 'full'}): {retrain.summary['tokens']} tokens, lr {c['lr']}, batch {c['batch_size']}"
        )
    if quant is not None:
        c = quant.summary["config"]
        scheme = _scheme_of(quant)
        how = (
            "round-to-nearest"
            if c.get("steps") == 0
            else f"quantization-aware local reconstruction, window {c['window']}, lr {c['lr']}, "
            f"{c['steps'] or c['epochs']} {'steps' if c['steps'] else 'epoch(s)'}"
            + (", learned scales" if c.get("learn_scales") else "")
        )
        lines.append(f"- Quantization: {scheme.describe()} ({how}) of the {quant.signature['from']} model")
        if fmt == "compressed-tensors":
            lines.append(
                "- Format: compressed-tensors pack-quantized (loads in vLLM and in transformers with compressed-tensors)"
                if scheme.symmetric
                else f"- Format: compressed-tensors pack-quantized, asymmetric: {ASYMMETRIC_LOAD}"
            )
    evals = work.eval_results("*")
    runs = {st: work.stage(name).run_id for st, name in STAGE_OF.items() if work.stage(name)}
    rows = [r for r in (read_json(p) for p in evals) if r.get("key", {}).get("run") == runs.get(r.get("model"))]
    if rows:
        lines += ["", "## Metrics", "", "| model | data | seqlen | tokens | perplexity |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['data']} | {r['seqlen']} | {r['tokens']} | {r['ppl']:.3f} |" for r in rows if "ppl" in r]
    if fmt == "compressed-tensors":
        lines += [
            "",
            "Pruned weights are zero codes; embeddings, the head and any linear layer outside the blocks are not quantized.",
            "",
        ]
    else:
        lines += ["", "Pruned weights are stored as zeros; the model loads with plain `transformers`.", ""]
    return "\n".join(lines)

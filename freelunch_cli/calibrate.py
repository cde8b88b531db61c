"""Stage 1: import the dense model as block shards, sample calibration windows, cache dense activations."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from dataclasses import asdict, dataclass

import torch

from freelunch_cli.console import Reporter
from freelunch_cli.data import read_text, resolve_text, sample_windows, text_fingerprint, tokenize
from freelunch_cli.errors import FreelunchError
from freelunch_cli.faults import checkpoint
from freelunch_cli.runtime import dtype_name, parse_dtype, pick_device
from freelunch_cli.skeleton import Skeleton, run_block
from freelunch_cli.arch import find_arch
from freelunch_cli.source import import_model, load_config, load_tokenizer, meta_model, resolve_model
from freelunch_cli.storage import StreamingTensorWriter, TensorRows, load_tensors, save_tensors_atomic
from freelunch_cli.workdir import WorkDir, stage_lock


@dataclass
class CalibrateConfig:
    model: str
    data: str
    gguf_file: str | None = None
    data_config: str | None = None
    data_split: str | None = None
    text_field: str = "text"
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    allow_overlap: bool = False
    device: str = "auto"
    dtype: str = "float32"  # compute dtype of the dense pass
    cache_dtype: str = "float16"  # storage dtype of the activation cache
    storage_dtype: str = "auto"  # dtype of the working model's shards ("auto": as the checkpoint)
    batch_size: int = 8
    cache_dir: str | None = None  # activation caches in another folder (e.g. node-local scratch)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def check_free_space(folder, needed: int, what: str) -> None:
    """Refuse before writing when the disk cannot hold what a stage plans to write."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise FreelunchError(
            f"not enough disk for the {what}: it needs {format_bytes(needed)} but {folder} has {format_bytes(free)} free"
        )


def calibrate(work: WorkDir, cfg: CalibrateConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False) -> dict:
    rep = rep or Reporter(quiet=True)
    if cfg.samples < 1 or cfg.seqlen < 2 or cfg.batch_size < 1:
        raise FreelunchError("--samples and --batch-size must be at least 1, --seqlen at least 2")
    compute = parse_dtype(cfg.dtype)
    cache_dtype = parse_dtype(cfg.cache_dtype)
    storage = None if cfg.storage_dtype == "auto" else parse_dtype(cfg.storage_dtype)
    device = pick_device(cfg.device)
    spec = resolve_model(cfg.model, cfg.gguf_file)
    src = resolve_text(cfg.data, cfg.data_config, cfg.data_split, cfg.text_field)
    text = read_text(src)
    signature = {
        **spec.signature(),
        "data": src.spec if src.path is None else str(src.path.resolve()),
        "data_config": src.config,
        "data_split": src.split if src.path is None else None,
        "data_sha": text_fingerprint(text),
        "samples": cfg.samples,
        "seqlen": cfg.seqlen,
        "seed": cfg.seed,
        "allow_overlap": cfg.allow_overlap,
        "dtype": dtype_name(compute),
        "cache_dtype": dtype_name(cache_dtype),
        "storage_dtype": cfg.storage_dtype,
    }
    # Everything that can be wrong with the input is checked before the work directory is touched.
    config = load_config(spec)
    n_blocks, hidden = find_arch(meta_model(config), config).num_blocks, config.hidden_size
    per_boundary = cfg.samples * cfg.seqlen * hidden * torch.tensor([], dtype=cache_dtype).element_size()
    planned = per_boundary * (n_blocks + 1)
    tok, ids = None, None
    previous = work.check_signature("calibrate", signature, force)
    if previous is None or force or work.rel(work.tokens_path) not in work.manifest()["files"]:
        tok = load_tokenizer(spec)
        ids = sample_windows(tokenize(tok, text), cfg.samples, cfg.seqlen, cfg.seed, cfg.allow_overlap)
    existing = sum(p.stat().st_size for p in (work.acts_dir / "dense").glob("boundary_*.safetensors")) if not force else 0
    check_free_space(Path(cfg.cache_dir) if cfg.cache_dir else work.root, planned - existing, "activation cache")

    with stage_lock(work, "calibrate"):
        state = work.begin("calibrate", signature, resume, force)
        if state == "fresh" or (cfg.cache_dir and state == "resume"):
            work.set_cache_dir(cfg.cache_dir)
        if state == "done":
            return work.report_done("calibrate", rep)
        t0 = time.time()
        rep.info(f"calibrate: model {spec.spec} -> {work.root}")
        rep.info(f"activation cache: {n_blocks + 1} boundaries x {cfg.samples} x {cfg.seqlen} x {hidden} "
                 f"in {dtype_name(cache_dtype)} = {format_bytes(planned)}")
        if work.damaged:
            rep.warn(f"recomputing {len(work.damaged)} missing or damaged file(s): {', '.join(work.damaged[:6])}")
        if work.rel(work.tokens_path) not in work.manifest()["files"]:
            if ids is None:
                tok = load_tokenizer(spec)
                ids = sample_windows(tokenize(tok, text), cfg.samples, cfg.seqlen, cfg.seed, cfg.allow_overlap)
            info = save_tensors_atomic(work.tokens_path, {"input_ids": ids}, {"source": src.spec, "seed": cfg.seed, "seqlen": cfg.seqlen})
            work.record_file(work.tokens_path, info)
        ids = load_tensors(work.check_file(work.tokens_path))["input_ids"]

        meta = import_model(spec, work, storage, tokenizer=tok, log=rep.info)
        t_import = time.time() - t0
        sk = Skeleton.from_work(work, "dense", device, compute, rest_device="cpu")
        missing = [i for i in range(n_blocks + 1) if work.rel(work.boundary_path("dense", i)) not in work.manifest()["files"]]

        t1 = time.time()
        with torch.no_grad(), rep.progress("dense pass", total=n_blocks + 1, completed=n_blocks + 1 - len(missing)) as bar:
            for b in missing:
                if b == 0:
                    producer = lambda rows: sk.embed(ids[rows])  # noqa: E731
                else:
                    block = sk.build_block(b - 1)
                    prev = TensorRows(work.check_file(work.boundary_path("dense", b - 1)))

                    def producer(rows, block=block, prev=prev, i=b - 1):
                        x = prev.rows(rows.start, rows.stop).to(device, compute)
                        return run_block(block, x, sk.block_call(i, x.shape[0], x.shape[1]))

                write_activations(work, work.boundary_path("dense", b), producer, cfg.samples, cfg.seqlen, hidden, cache_dtype, cfg.batch_size)
                checkpoint("calibrate.boundary")
                bar.advance()
        t_pass = time.time() - t1
        summary = {
            "work": str(work.root),
            "model": spec.spec,
            "model_type": meta["model_type"],
            "num_blocks": n_blocks,
            "hidden_size": hidden,
            "samples": cfg.samples,
            "seqlen": cfg.seqlen,
            "tokens": cfg.samples * cfg.seqlen,
            "cache_bytes": planned,
            "storage_dtype": meta["storage_dtype"],
            "seconds_import": round(t_import, 2),
            "seconds_dense_pass": round(t_pass, 2),
            "seconds": round(time.time() - t0, 2),
            "config": asdict(cfg),
        }
        work.finish("calibrate", summary)
    rep.summary(
        f"calibrated {n_blocks} blocks on {cfg.samples} x {cfg.seqlen} tokens in {summary['seconds']:.1f}s "
        f"(cache {format_bytes(planned)})",
        summary,
    )
    return summary


def write_activations(work: WorkDir, path, producer, samples: int, seqlen: int, hidden: int, dtype, batch_size: int):
    """Compute an activation cache file batch by batch (``producer(slice)`` gives the rows) and record it."""
    limit = torch.finfo(dtype).max
    with StreamingTensorWriter(path, "hidden", (samples, seqlen, hidden), dtype) as w:
        for start in range(0, samples, batch_size):
            out = producer(slice(start, min(start + batch_size, samples)))
            peak = out.abs().max().item()
            if peak > limit:
                raise FreelunchError(
                    f"hidden states in {path.name} reach {peak:.0f}, beyond {dtype_name(dtype)}'s range; "
                    f"rerun calibrate with --cache-dtype bfloat16 --force"
                )
            w.append(out)
    work.record_file(path, w.info)

"""Stage 1: import the dense model as block shards, sample calibration sequences, cache dense activations."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from freelunch_cli.configs.stage_configs import CalibrateConfig
from freelunch_cli.core.console import Reporter
from freelunch_cli.core.device import dtype_name, parse_dtype, resolve
from freelunch_cli.core.kill_points import kill_point
from freelunch_cli.core.units import format_bytes
from freelunch_cli.engine.boundaries import write_boundary
from freelunch_cli.model.activations import cache_dtype_of
from freelunch_cli.model.arch import find_arch
from freelunch_cli.model.build import meta_model, position_limit
from freelunch_cli.model.skeleton import Skeleton
from freelunch_cli.model.source import import_model, load_config, load_tokenizer, resolve_model
from freelunch_cli.model.text import read_text, resolve_text, sample_sequences, text_fingerprint, tokenize
from freelunch_cli.workdir.directory import WorkDir, expand_cache_dir
from freelunch_cli.workdir.files import TensorRows, check_free_space, load_tensors, save_tensors_atomic
from freelunch_cli.workdir.stage import StageState, check_signature, finished, open_stage


def calibrate(
    work: WorkDir, cfg: CalibrateConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False
) -> dict:
    """Write the dense model's shards, the calibration token ids ``[samples, seqlen]`` and the dense activation cache
    (``blocks + 1`` boundaries of ``[samples, seqlen, hidden]`` in ``--cache-dtype``) into ``work``; return the summary.

    A float16 boundary whose hidden states exceed float16's range is stored in bfloat16 instead (its file records its
    dtype; the console says so and the summary lists it under ``cache_widened``): the run never stops for it.
    Everything that can be wrong with the input is checked before the work directory is touched.
    """
    rep = rep or Reporter(quiet=True)
    cfg.validate()
    device, compute = resolve(cfg.device, cfg.dtype)
    cfg = replace(cfg, dtype=dtype_name(compute))  # recorded as run
    cache_dtype = parse_dtype(cfg.cache_dtype)
    storage = None if cfg.storage_dtype == "auto" else parse_dtype(cfg.storage_dtype)
    spec = resolve_model(cfg.model, cfg.gguf_file, cfg.trust_remote_code)
    src = resolve_text(cfg.data, cfg.data_config, cfg.data_split, cfg.text_field)
    text = read_text(src, rep.warn)
    signature = cfg.signature(spec.signature(), src.signature(text_fingerprint(text)))
    config = load_config(spec)
    lm = meta_model(config, spec.trust_remote_code)
    n_blocks, hidden = find_arch(lm, config).num_blocks, config.hidden_size
    limit = position_limit(lm, config)
    if limit is not None:
        limit.check(cfg.seqlen, "--seqlen", rep.warn)
    per_boundary = cfg.samples * cfg.seqlen * hidden * torch.tensor([], dtype=cache_dtype).element_size()
    planned = per_boundary * (n_blocks + 1)
    tokenizer, ids = None, None
    previous = check_signature(work, "calibrate", signature, force)
    if previous is None or force or not work.is_recorded(work.tokens_path):  # sampling checks that the text suffices
        tokenizer = load_tokenizer(spec)
        ids = sample_sequences(tokenize(tokenizer, text), cfg.samples, cfg.seqlen, cfg.seed, cfg.allow_overlap)
    if force or not finished(work, "calibrate", signature):  # a finished calibration writes nothing when run again
        _check_disk(work, cfg, spec, lm, storage or getattr(config, "dtype", None), planned, force)

    with open_stage(work, "calibrate", signature, rep, resume=resume, force=force) as run:
        if run.state is StageState.FRESH or (cfg.cache_dir and run.state is StageState.RESUMED):
            work.set_cache_dir(cfg.cache_dir, fresh=run.state is StageState.FRESH)
        if run.done:
            return run.summary
        rep.info(f"calibrate: model {spec.spec} -> {work.root}")
        rep.info(
            f"activation cache: {n_blocks + 1} boundaries x {cfg.samples} x {cfg.seqlen} x {hidden} "
            f"in {dtype_name(cache_dtype)} = {format_bytes(planned)}"
        )
        if not work.is_recorded(work.tokens_path):
            if ids is None:
                tokenizer = load_tokenizer(spec)
                ids = sample_sequences(tokenize(tokenizer, text), cfg.samples, cfg.seqlen, cfg.seed, cfg.allow_overlap)
            info = save_tensors_atomic(
                work.tokens_path, {"input_ids": ids}, {"source": src.spec, "seed": cfg.seed, "seqlen": cfg.seqlen}
            )
            work.record_file(work.tokens_path, info)
        ids = load_tensors(work.check_file(work.tokens_path))["input_ids"]

        meta = import_model(spec, work, storage, tokenizer=tokenizer, log=rep.info, config=config)
        t_import = run.seconds()
        sk = Skeleton.from_work(work, "dense", device, compute, rest_device="cpu")
        # a run begun before calibrate kept statistics keeps going without them (prune then computes them itself)
        with_stats = run.state is StageState.FRESH or any(work.is_recorded(work.input_stats_path(i)) for i in range(n_blocks))
        missing = [b for b in range(n_blocks + 1) if not _boundary_done(work, b, with_stats)]
        t_pass = time.time()
        with torch.no_grad(), rep.progress("dense pass", total=n_blocks + 1, completed=n_blocks + 1 - len(missing)) as bar:
            for b in missing:
                write_boundary(work, sk, b, ids, cfg, cache_dtype, compute, with_stats, rep.info)
                kill_point("calibrate.boundary")
                bar.advance()
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
            "cache_widened": _widened(work, n_blocks, cache_dtype),
            "seconds_import": round(t_import, 2),
            "seconds_dense_pass": round(time.time() - t_pass, 2),
        }
        return run.finish(
            summary,
            f"calibrated {n_blocks} blocks on {cfg.samples} x {cfg.seqlen} tokens in "
            f"{run.seconds():.1f}s (cache {format_bytes(planned)})",
            config=cfg,
        )


def _check_disk(work: WorkDir, cfg: CalibrateConfig, spec, lm, storage, cache_bytes: int, force: bool) -> None:
    """Refuse before writing when the disk cannot hold what calibrate writes: the model's shards (its parameters in
    the storage dtype), its tokenizer and code files, and the activation cache; what an interrupted run already
    wrote counts as written."""
    itemsize = storage.itemsize if isinstance(storage, torch.dtype) else 4
    model_bytes = sum(p.numel() for p in lm.parameters()) * itemsize
    model_bytes += sum(
        f.stat().st_size for f in spec.folder.iterdir() if f.is_file() and f.suffix in (".json", ".model", ".txt", ".py")
    )
    if not force:
        model_bytes -= sum(f.stat().st_size for f in work.model_dir("dense").glob("*") if f.is_file())
        cache_bytes -= sum(f.stat().st_size for f in (work.acts_dir / "dense").glob("boundary_*.safetensors"))
    cache = expand_cache_dir(cfg.cache_dir) if cfg.cache_dir else work.root
    if _device_of(cache) == _device_of(work.root):
        check_free_space(work.root, model_bytes + cache_bytes, "activation cache", " (with the model's shards)")
    else:
        check_free_space(work.root, model_bytes, "model shards")
        check_free_space(cache, cache_bytes, "activation cache")


def _device_of(folder: Path) -> int:
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder.stat().st_dev


def _boundary_done(work: WorkDir, b: int, with_stats: bool) -> bool:
    """Boundary ``b`` and, for b > 0 and ``with_stats``, the input statistics of block ``b - 1`` gathered on the way
    are recorded."""
    stats = not with_stats or b == 0 or work.is_recorded(work.input_stats_path(b - 1))
    return work.is_recorded(work.boundary_path("dense", b)) and stats


def _widened(work: WorkDir, n_blocks: int, cache_dtype: torch.dtype) -> dict[str, list[int]]:
    """The dense boundaries stored in another dtype than ``cache_dtype`` (beyond its range), by dtype name; read from
    the files' headers, so boundaries written before a resume count too."""
    out: dict[str, list[int]] = {}
    for b in range(n_blocks + 1):
        if work.is_evicted(work.boundary_path("dense", b)):  # deleted on purpose by a later stage: its dtype was counted
            continue
        dtype = cache_dtype_of(TensorRows(work.check_file(work.boundary_path("dense", b))))
        if dtype != cache_dtype:
            out.setdefault(dtype_name(dtype), []).append(b)
    return out

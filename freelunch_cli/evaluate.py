"""The eval stage: perplexity of a work directory's model (any stage) or of any model path."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from freelunch_cli.console import Reporter
from freelunch_cli.data import read_text, resolve_text, text_fingerprint, tokenize
from freelunch_cli.errors import FreelunchError
from freelunch_cli.perplexity import chunk_size, perplexity, split_windows
from freelunch_cli.runtime import dtype_name, parse_dtype, pick_device
from freelunch_cli.skeleton import Skeleton
from freelunch_cli.source import load_config, load_tokenizer, resolve_model
from freelunch_cli.storage import read_json, write_json_atomic
from freelunch_cli.workdir import MODEL_STAGES, WorkDir

MAX_DEFAULT_SEQLEN = 4096


@dataclass
class EvalConfig:
    ppl: list[str] = field(default_factory=list)
    seqlen: int | None = None  # default: the model's context length, capped at 4096
    stage: str = "latest"
    limit_windows: int | None = None
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "float32"
    model: str | None = None  # evaluate this model path instead of a work directory
    gguf_file: str | None = None


def default_seqlen(config) -> int:
    return min(int(getattr(config, "max_position_embeddings", 2048) or 2048), MAX_DEFAULT_SEQLEN)


def _stage_run(work: WorkDir, stage: str) -> str:
    name = {"dense": "calibrate", "pruned": "prune", "reconstructed": "reconstruct"}[stage]
    return work.stage(name).run_id


def evaluate(work: WorkDir | None, cfg: EvalConfig, rep: Reporter | None = None) -> dict:
    rep = rep or Reporter(quiet=True)
    if not cfg.ppl:
        raise FreelunchError("nothing to evaluate: pass --ppl FILE (or a datasets name)")
    if cfg.seqlen is not None and cfg.seqlen < 2:
        raise FreelunchError("--seqlen must be at least 2")
    compute = parse_dtype(cfg.dtype)
    device = pick_device(cfg.device)
    sources = [resolve_text(p, default_split="test") for p in cfg.ppl]
    if cfg.model is not None:
        spec = resolve_model(cfg.model, cfg.gguf_file)
        tok = load_tokenizer(spec)
        config = load_config(spec)
        label, run_id = spec.spec, None
        sk_factory = lambda: Skeleton.from_model(  # noqa: E731
            AutoModelForCausalLM.from_pretrained(spec.folder, dtype=torch.float32, config=config, **spec.hf_kwargs()), device, compute
        )
    else:
        if work is None:
            raise FreelunchError("pass --work DIR or --model PATH")
        stage = work.latest_model_stage() if cfg.stage == "latest" else cfg.stage
        if stage not in MODEL_STAGES:
            raise FreelunchError(f"--stage must be latest or one of {', '.join(MODEL_STAGES)}")
        if stage != "dense":
            st = work.stage({"pruned": "prune", "reconstructed": "reconstruct"}[stage])
            if st is None or st.status != "done":
                raise FreelunchError(f"no finished {stage} model in {work.root}")
        work.require_done("calibrate", "eval")
        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(work.model_dir("dense"))
        config = AutoConfig.from_pretrained(work.model_dir("dense"))
        label, run_id = stage, _stage_run(work, stage)
        sk_factory = lambda: Skeleton.from_work(work, stage, device, compute)  # noqa: E731
    seqlen = cfg.seqlen or default_seqlen(config)
    results, sk = [], None
    for src in sources:
        text = read_text(src)
        key = {"model": label, "run": run_id, "data": src.spec, "data_sha": text_fingerprint(text), "seqlen": seqlen, "limit_windows": cfg.limit_windows, "dtype": dtype_name(compute)}
        out_path = work.root / "eval" / f"{label}__{src.name}__L{seqlen}.json" if work is not None and cfg.model is None else None
        if out_path is not None and out_path.exists():
            cached = read_json(out_path)
            if cached.get("key") == key:
                rep.info(f"{label} on {src.name}: cached")
                results.append(cached)
                continue
        windows = split_windows(tokenize(tok, text), seqlen, cfg.limit_windows)
        if len(windows) == 0:
            raise FreelunchError(f"{src.spec} has fewer than {seqlen} tokens: no window to evaluate (lower --seqlen)")
        if sk is None:
            sk = sk_factory()
        t0 = time.time()
        chunks = -(-len(windows) // chunk_size(config.hidden_size, seqlen, cfg.batch_size))
        with rep.progress(f"ppl {src.name}", total=sk.num_blocks * chunks) as bar:
            res = perplexity(sk, windows, cfg.batch_size, on_block=bar.advance)
        res.update(key=key, model=label, data=src.name, seconds=round(time.time() - t0, 2))
        if out_path is not None:
            write_json_atomic(out_path, res)
        results.append(res)
    rep.table(
        "perplexity",
        ["model", "data", "seqlen", "tokens", "ppl"],
        [[r["model"], r["data"], r["seqlen"], r["tokens"], f"{r['ppl']:.3f}"] for r in results],
    )
    summary = {"results": results}
    rep.summary(" · ".join(f"{r['model']} {r['data']}: ppl {r['ppl']:.3f}" for r in results), summary)
    return summary


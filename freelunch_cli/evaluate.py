"""The eval stage: perplexity and zero-shot accuracy of a work directory's model (any stage) or any model path."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from freelunch_cli.console import Reporter
from freelunch_cli.data import read_text, resolve_text, text_fingerprint, tokenize
from freelunch_cli.errors import FreelunchError
from freelunch_cli.perplexity import chunk_size, perplexity, split_windows
from freelunch_cli.runtime import dtype_name, parse_dtype, pick_device
from freelunch_cli.skeleton import Skeleton
from freelunch_cli.source import load_config, load_tokenizer, resolve_model
from freelunch_cli.storage import read_json, write_json_atomic
from freelunch_cli.workdir import STAGE_OF, WorkDir

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
    tasks: list[str] = field(default_factory=list)  # lm-eval task names
    tasks_dir: str | None = None  # folder of local lm-eval task YAMLs
    limit: int | None = None  # lm-eval: at most this many documents per task


def default_seqlen(config) -> int:
    return min(int(getattr(config, "max_position_embeddings", 2048) or 2048), MAX_DEFAULT_SEQLEN)


class _Target:
    """What is evaluated: a work directory's stage or a model path; builds the streamed or whole model once."""

    def __init__(self, work: WorkDir | None, cfg: EvalConfig, device, compute):
        self.device, self.compute, self.work = device, compute, work
        self._sk = None
        self._whole = None
        if cfg.model is not None:
            self.spec = resolve_model(cfg.model, cfg.gguf_file)
            self.tokenizer = load_tokenizer(self.spec)
            self.config = load_config(self.spec)
            self.label, self.run_id, self.stage = self.spec.spec, None, None
            return
        if work is None:
            raise FreelunchError("pass --work DIR or --model PATH")
        stage = work.require_model(cfg.stage)
        st = work.stage(STAGE_OF[stage])
        self.tokenizer = AutoTokenizer.from_pretrained(work.model_dir("dense"))
        self.config = AutoConfig.from_pretrained(work.model_dir("dense"))
        self.label, self.run_id, self.stage = stage, st.run_id, stage

    def _load_whole(self):
        return AutoModelForCausalLM.from_pretrained(self.spec.folder, dtype=torch.float32, config=self.config, **self.spec.hf_kwargs())

    def skeleton(self) -> Skeleton:
        if self._sk is None:
            if self.stage is None:
                self._sk = Skeleton.from_model(self._load_whole(), self.device, self.compute)
            else:
                self._sk = Skeleton.from_work(self.work, self.stage, self.device, self.compute)
        return self._sk

    def whole(self):
        if self._whole is None:
            from freelunch_cli.zeroshot import materialize

            if self.stage is None:
                self._whole = self._load_whole().to(self.device, self.compute).eval()
            else:
                self._whole = materialize(self.work, self.stage, self.device, self.compute)
        return self._whole

    def result_path(self, name: str):
        if self.work is None or self.stage is None:
            return None
        return self.work.root / "eval" / f"{self.label}__{name}.json"


def _cached(path, key: dict):
    if path is not None and path.exists():
        try:
            rec = read_json(path)
        except FreelunchError:
            return None
        if rec.get("key") == key:
            return rec
    return None


def evaluate(work: WorkDir | None, cfg: EvalConfig, rep: Reporter | None = None) -> dict:
    rep = rep or Reporter(quiet=True)
    if not cfg.ppl and not cfg.tasks:
        raise FreelunchError("nothing to evaluate: pass --ppl FILE (or a datasets name) and/or --tasks NAMES")
    if cfg.seqlen is not None and cfg.seqlen < 2:
        raise FreelunchError("--seqlen must be at least 2")
    compute = parse_dtype(cfg.dtype)
    device = pick_device(cfg.device)
    sources = [resolve_text(p, default_split="test") for p in cfg.ppl]
    target = _Target(work, cfg, device, compute)
    seqlen = cfg.seqlen or default_seqlen(target.config)
    results = []
    for src in sources:
        text = read_text(src)
        key = {"model": target.label, "run": target.run_id, "data": src.spec, "data_sha": text_fingerprint(text), "seqlen": seqlen,
               "limit_windows": cfg.limit_windows, "dtype": dtype_name(compute)}
        path = target.result_path(f"{src.name}__L{seqlen}")
        cached = _cached(path, key)
        if cached is not None:
            rep.info(f"{target.label} on {src.name}: cached")
            results.append(cached)
            continue
        windows = split_windows(tokenize(target.tokenizer, text), seqlen, cfg.limit_windows)
        if len(windows) == 0:
            raise FreelunchError(f"{src.spec} has fewer than {seqlen} tokens: no window to evaluate (lower --seqlen)")
        sk = target.skeleton()
        t0 = time.time()
        chunks = -(-len(windows) // chunk_size(target.config.hidden_size, seqlen, cfg.batch_size))
        with rep.progress(f"ppl {src.name}", total=sk.num_blocks * chunks) as bar:
            res = perplexity(sk, windows, cfg.batch_size, on_block=bar.advance)
        res.update(key=key, model=target.label, data=src.name, seconds=round(time.time() - t0, 2))
        if path is not None:
            write_json_atomic(path, res)
        results.append(res)
    if results:
        rep.table("perplexity", ["model", "data", "seqlen", "tokens", "ppl"],
                  [[r["model"], r["data"], r["seqlen"], r["tokens"], f"{r['ppl']:.3f}"] for r in results])
    summary: dict = {"results": results}
    if cfg.tasks:
        summary["zero_shot"] = _zero_shot(target, cfg, device, compute, rep)
    line = " · ".join(f"{r['model']} {r['data']}: ppl {r['ppl']:.3f}" for r in results)
    if cfg.tasks and summary["zero_shot"]["mean_acc"] is not None:
        line += (" · " if line else "") + f"{target.label} mean zero-shot acc {summary['zero_shot']['mean_acc']:.4f}"
    rep.summary(line, summary)
    return summary


def _zero_shot(target: _Target, cfg: EvalConfig, device, compute, rep: Reporter) -> dict:
    from freelunch_cli.zeroshot import zero_shot

    tasks = sorted(set(cfg.tasks))
    key = {"model": target.label, "run": target.run_id, "tasks": tasks, "tasks_dir": cfg.tasks_dir, "limit": cfg.limit,
           "dtype": dtype_name(compute)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    path = target.result_path(f"tasks-{digest}")
    res = _cached(path, key)
    if res is None:
        t0 = time.time()
        rep.info(f"zero-shot on {', '.join(tasks)} (lm-eval)")
        res = zero_shot(target.whole(), target.tokenizer, tasks, cfg.tasks_dir, cfg.batch_size, cfg.limit, device)
        res.update(key=key, model=target.label, seconds=round(time.time() - t0, 2))
        if path is not None:
            write_json_atomic(path, res)
    rows = [[t, f"{m.get('acc', float('nan')):.4f}", f"{m['acc_norm']:.4f}" if "acc_norm" in m else "-"] for t, m in res["tasks"].items()]
    if res["mean_acc"] is not None:
        rows.append(["mean", f"{res['mean_acc']:.4f}", ""])
    rep.table(f"zero-shot accuracy ({target.label})", ["task", "acc", "acc_norm"], rows)
    return res

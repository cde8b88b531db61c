"""The eval stage: perplexity and zero-shot accuracy of a work directory's model (any stage) or any model path."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace

from transformers import AutoModelForCausalLM

from freelunch_cli.configs.stage_configs import EvalConfig
from freelunch_cli.core.console import Reporter
from freelunch_cli.core.device import available_memory, dtype_name, resolve
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.engine.models import require_model
from freelunch_cli.evaluation.perplexity import chunk_size, perplexity, split_sequences
from freelunch_cli.model.build import meta_model, position_limit
from freelunch_cli.model.skeleton import Skeleton
from freelunch_cli.model.source import (
    Checkpoint,
    load_config,
    load_tokenizer,
    resolve_model,
    trusts_remote_code,
    work_config,
    work_tokenizer,
)
from freelunch_cli.model.text import read_text, resolve_text, text_fingerprint, tokenize
from freelunch_cli.workdir.directory import STAGE_OF, WorkDir
from freelunch_cli.workdir.files import read_json, write_json_atomic

MAX_DEFAULT_SEQLEN = 4096
PPL_MEMORY_SHARE = 0.3  # of the device's free memory, for the hidden states of one chunk of perplexity sequences


def default_seqlen(config) -> int:
    return min(int(getattr(config, "max_position_embeddings", 2048) or 2048), MAX_DEFAULT_SEQLEN)


class _Target:
    """What is evaluated: a work directory's stage or a model path; builds the streamed or whole model once."""

    def __init__(self, work: WorkDir | None, cfg: EvalConfig, device, compute):
        self.device, self.compute, self.work = device, compute, work
        self._sk = None
        self._whole = None
        if cfg.model is not None:
            self.spec = resolve_model(cfg.model, cfg.gguf_file, cfg.trust_remote_code)
            self.tokenizer = load_tokenizer(self.spec)
            self.config = load_config(self.spec)
            self.label, self.run_id, self.stage = self.spec.spec, None, None
            trusted = self.spec.trust_remote_code
        elif work is None:
            raise FreelunchError("pass --work DIR or --model PATH")
        else:
            stage = require_model(work, cfg.stage)
            self.tokenizer, self.config = work_tokenizer(work), work_config(work)
            self.label, self.run_id, self.stage = stage, work.stage(STAGE_OF[stage]).run_id, stage
            trusted = trusts_remote_code(work)
        self.position_limit = position_limit(meta_model(self.config, trusted), self.config)

    def skeleton(self) -> Skeleton:
        """The model streamed block by block: from the work directory's shards, or from ``--model``'s checkpoint."""
        if self._sk is None:
            if self.stage is not None:
                self._sk = Skeleton.from_work(self.work, self.stage, self.device, self.compute)
            elif (checkpoint := Checkpoint(self.spec, self.config)).streamable:
                self._sk = Skeleton.from_checkpoint(checkpoint, self.config, self.device, self.compute)
            else:  # GGUF or .bin: transformers loads it whole
                whole = AutoModelForCausalLM.from_pretrained(
                    self.spec.folder, dtype=self.compute, config=self.config, **self.spec.model_kwargs()
                )
                self._sk = Skeleton.from_model(whole, self.device, self.compute)
        return self._sk

    def whole(self):
        """The whole model for lm-eval, in the compute dtype, on the device or spread over the node's GPUs (accelerate)."""
        if self._whole is None:
            from freelunch_cli.model.assembly import dispatch, materialize

            if self.stage is None:
                lm = AutoModelForCausalLM.from_pretrained(
                    self.spec.folder, dtype=self.compute, config=self.config, **self.spec.model_kwargs()
                )
            else:
                lm = materialize(self.work, self.stage, "cpu", self.compute)
            self._whole = dispatch(lm.eval(), self.device)
        return self._whole

    def result_path(self, name: str):
        if self.work is None or self.stage is None:
            return None
        return self.work.eval_result_path(self.label, name)


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
    """Perplexity on each ``--ppl`` text and lm-eval accuracy on ``--tasks`` of a work directory's model (or of
    ``--model``); results are kept in ``WORK/eval`` and an identical evaluation is read from there."""
    rep = rep or Reporter(quiet=True)
    cfg.validate()
    device, compute = resolve(cfg.device, cfg.dtype)
    cfg = replace(cfg, dtype=dtype_name(compute))  # recorded as run
    sources = [resolve_text(p, default_split="test") for p in cfg.ppl]
    target = _Target(work, cfg, device, compute)
    seqlen = cfg.seqlen or default_seqlen(target.config)
    if target.position_limit is not None and cfg.ppl:
        target.position_limit.check(seqlen, "--seqlen", rep.warn)
    results = []
    for src in sources:
        text = read_text(src, rep.warn)
        key = {
            **cfg.signature(target.label, target.run_id),
            "data": src.spec,
            "data_sha": text_fingerprint(text),
            "seqlen": seqlen,
            "limit_windows": cfg.limit_sequences,
        }  # the key's name predates --limit-sequences: cached results stay valid
        path = target.result_path(f"{src.name}__L{seqlen}")
        cached = _cached(path, key)
        if cached is not None:
            rep.info(f"{target.label} on {src.name}: cached")
            results.append(cached)
            continue
        sequences = split_sequences(tokenize(target.tokenizer, text), seqlen, cfg.limit_sequences)
        if len(sequences) == 0:
            raise FreelunchError(f"{src.spec} has fewer than {seqlen} tokens: no window to evaluate (lower --seqlen)")
        sk = target.skeleton()
        t0 = time.time()
        budget = int(
            PPL_MEMORY_SHARE * available_memory(device)
        )  # hidden states of this many bytes: each block read once per chunk
        chunks = -(-len(sequences) // chunk_size(target.config.hidden_size, seqlen, cfg.batch_size, budget))
        with rep.progress(f"ppl {src.name}", total=sk.num_blocks * chunks) as bar:
            res = perplexity(sk, sequences, cfg.batch_size, budget, on_block=bar.advance)
        res.update(key=key, model=target.label, data=src.name, seconds=round(time.time() - t0, 2))
        if path is not None:
            write_json_atomic(path, res)
        results.append(res)
    if results:
        rep.table(
            "perplexity",
            ["model", "data", "seqlen", "tokens", "ppl"],
            [[r["model"], r["data"], r["seqlen"], r["tokens"], f"{r['ppl']:.3f}"] for r in results],
        )
    summary: dict = {"results": results}
    if cfg.tasks:
        summary["zero_shot"] = _zero_shot(target, cfg, device, compute, rep)
    line = " · ".join(f"{r['model']} {r['data']}: ppl {r['ppl']:.3f}" for r in results)
    if cfg.tasks and summary["zero_shot"]["mean_acc"] is not None:
        line += (" · " if line else "") + f"{target.label} mean zero-shot acc {summary['zero_shot']['mean_acc']:.4f}"
    rep.summary(line, summary)
    return summary


def _zero_shot(target: _Target, cfg: EvalConfig, device, compute, rep: Reporter) -> dict:
    from freelunch_cli.evaluation.zeroshot import zero_shot

    tasks = sorted(set(cfg.tasks))
    key = {**cfg.signature(target.label, target.run_id), "tasks": tasks, "tasks_dir": cfg.tasks_dir, "limit": cfg.limit}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    path = target.result_path(f"tasks-{digest}")
    res = _cached(path, key)
    if res is None:
        t0 = time.time()
        rep.info(f"zero-shot on {', '.join(tasks)} (lm-eval)")
        res = zero_shot(target.whole(), target.tokenizer, tasks, cfg.tasks_dir, cfg.batch_size, cfg.limit, device, rep.warn)
        res.update(key=key, model=target.label, seconds=round(time.time() - t0, 2))
        if path is not None:
            write_json_atomic(path, res)
    rows = [
        [t, f"{m.get('acc', float('nan')):.4f}", f"{m['acc_norm']:.4f}" if "acc_norm" in m else "-"]
        for t, m in res["tasks"].items()
    ]
    if res["mean_acc"] is not None:
        rows.append(["mean", f"{res['mean_acc']:.4f}", ""])
    rep.table(f"zero-shot accuracy ({target.label})", ["task", "acc", "acc_norm"], rows)
    return res

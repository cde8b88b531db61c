"""Zero-shot accuracy with lm-evaluation-harness on an in-memory model (offline task YAMLs supported).

lm-eval needs the whole model as one module, so the work directory's blocks are assembled into a
regular ``transformers`` model on the device (memory: the full model). For models larger than one device,
export the checkpoint and run lm-eval with its own multi-device options.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from freelunch_cli.errors import FreelunchError
from freelunch_cli.skeleton import prepare_config
from freelunch_cli.arch import find_arch
from freelunch_cli.source import meta_model
from freelunch_cli.storage import load_tensors


def materialize(work, stage: str, device, dtype: torch.dtype) -> nn.Module:
    """The work directory's model of ``stage`` as a plain ``transformers`` model."""
    folder = work.model_dir("dense")
    config = prepare_config(AutoConfig.from_pretrained(folder))
    lm = meta_model(config)
    arch = find_arch(lm, config)
    state = dict(load_tensors(work.check_file(work.rest_path(stage))))
    for i in range(arch.num_blocks):
        state.update({arch.block_prefix(i) + k: v for k, v in load_tensors(work.stage_block_path(stage, i)).items()})
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    lm.load_state_dict(state, assign=True, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        lm.tie_weights()
    with torch.no_grad():  # non-persistent buffers (rotary frequencies) are not in any checkpoint
        for mod in lm.modules():
            if any(name in mod._non_persistent_buffers_set for name in mod._buffers):
                for name in list(mod._buffers):
                    if mod._buffers[name] is not None and mod._buffers[name].is_meta:
                        mod._buffers[name] = torch.empty_like(mod._buffers[name], device="cpu")
                lm._init_weights(mod)
    missing = [n for n, p in list(lm.named_parameters()) + list(lm.named_buffers()) if p.is_meta]
    if missing:
        raise FreelunchError(f"could not assemble the model: no values for {missing[:4]}")
    return lm.to(device=device, dtype=dtype).eval()


def task_manager(tasks: list[str], tasks_dir: str | None):
    from lm_eval.tasks import TaskManager

    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise FreelunchError(f"--tasks-dir {tasks_dir} is not a folder")
    if tasks_dir is None:
        return TaskManager()
    local = TaskManager(include_path=tasks_dir, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):  # indexing the built-in tasks takes long; skip it when we can
        return local
    return TaskManager(include_path=tasks_dir)


def zero_shot(model: nn.Module, tokenizer, tasks: list[str], tasks_dir: str | None, batch_size: int, limit: int | None,
              device) -> dict:
    """Accuracy per task (``acc``, and ``acc_norm`` where the task defines it) and their mean."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tm = task_manager(tasks, tasks_dir)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        hint = f" (looked in --tasks-dir {tasks_dir} and lm-eval's tasks)" if tasks_dir else " (pass --tasks-dir for local task YAMLs)"
        raise FreelunchError(f"unknown lm-eval task(s) {', '.join(unknown)}{hint}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, log_samples=False,
                                      bootstrap_iters=0)
    except Exception as e:  # lm-eval failing to fetch a dataset offline is the common case
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FreelunchError(f"lm-eval failed on {', '.join(tasks)}: {first}") from None
    results = {}
    for task, metrics in out["results"].items():
        row = {k.split(",")[0]: v for k, v in metrics.items() if k.split(",")[0] in ("acc", "acc_norm") and isinstance(v, (int, float))}
        if row:
            results[task] = row
    accs = [r["acc"] for r in results.values() if "acc" in r]
    return {"tasks": results, "mean_acc": sum(accs) / len(accs) if accs else None, "limit": limit}

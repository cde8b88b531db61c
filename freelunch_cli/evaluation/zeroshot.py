"""Zero-shot accuracy with lm-evaluation-harness on an in-memory model (offline task YAMLs supported).

lm-eval needs the whole model as one module, so the work directory's blocks are assembled into a
regular ``transformers`` model on the device (memory: the full model). For models larger than one device,
export the checkpoint and run lm-eval with its own multi-device options.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from freelunch_cli.core.errors import FreelunchError


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


def prefix_token(tokenizer) -> tuple[int | None, str | None]:
    """The token lm-eval puts before an empty context: BOS, else EOS (lm-eval's own choice, returned as None), else
    for a tokenizer that has neither, the padding or unknown token, else the token of a newline; with a note saying
    which was chosen."""
    if tokenizer.bos_token_id is not None or tokenizer.eos_token_id is not None:
        return None, None
    for name in ("pad", "unk"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            return token_id, f"the tokenizer has no BOS or EOS token; lm-eval's empty-context prefix is its {name} token"
    token_id = tokenizer.encode("\n", add_special_tokens=False)[-1]
    return (
        token_id,
        f"the tokenizer has no BOS, EOS, padding or unknown token; lm-eval's empty-context prefix is token {token_id} (a newline)",
    )


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    tasks_dir: str | None,
    batch_size: int,
    limit: int | None,
    device,
    warn=None,
) -> dict:
    """Accuracy per task (``acc``, and ``acc_norm`` where the task defines it) and their mean; ``warn`` hears about a
    tokenizer without BOS or EOS token."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tm = task_manager(tasks, tasks_dir)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        hint = (
            f" (looked in --tasks-dir {tasks_dir} and lm-eval's tasks)"
            if tasks_dir
            else " (pass --tasks-dir for local task YAMLs)"
        )
        raise FreelunchError(f"unknown lm-eval task(s) {', '.join(unknown)}{hint}")
    prefix, note = prefix_token(tokenizer)
    if note and warn is not None:
        warn(note)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), prefix_token_id=prefix)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, log_samples=False, bootstrap_iters=0)
    except Exception as e:  # lm-eval failing to fetch a dataset offline is the common case
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FreelunchError(f"lm-eval failed on {', '.join(tasks)}: {first}") from None
    results = {}
    for task, metrics in out["results"].items():
        row = {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if k.split(",")[0] in ("acc", "acc_norm") and isinstance(v, (int, float))
        }
        if row:
            results[task] = row
    accs = [r["acc"] for r in results.values() if "acc" in r]
    return {"tasks": results, "mean_acc": sum(accs) / len(accs) if accs else None, "limit": limit}

"""One table of every metric across runs (dense baseline first), as Markdown and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.workdir.directory import STAGE_OF, WorkDir
from freelunch_cli.workdir.files import read_json, write_bytes_atomic, write_json_atomic


def stage_results(work: WorkDir, stage: str) -> dict[str, float]:
    """Metrics measured on one model of a run (only results of its current stage run count)."""
    st = work.stage(STAGE_OF[stage])
    if st is None or st.status != "done":
        return {}
    metrics = {}
    for p in work.eval_results(stage):
        try:
            rec = read_json(p)
        except FreelunchError:
            continue
        if rec.get("key", {}).get("run") != st.run_id:
            continue
        if "ppl" in rec:
            metrics[f"ppl {rec['data']} L{rec['seqlen']}"] = rec["ppl"]
        for task, m in rec.get("tasks", {}).items():
            if "acc" in m:
                metrics[f"{task} acc"] = m["acc"]
        if rec.get("mean_acc") is not None:
            metrics["mean acc"] = rec["mean_acc"]
    return metrics


def describe(work: WorkDir, stage: str) -> str:
    if stage == "dense":
        return "dense"
    steps = work.lineage(stage)
    pr, rc, ret, qu = steps.get("prune"), steps.get("reconstruct"), steps.get("retrain"), steps.get("quantize")
    if qu is not None:
        before = describe(work, qu.signature["from"])
        c = qu.summary.get("config", {})
        how = "round-to-nearest" if c.get("steps") == 0 else f"quantization-aware reconstruction, lr {c.get('lr')}"
        return f"{before} + {qu.signature.get('scheme')} g{qu.signature.get('group_size')} ({how})"
    if ret is not None and pr is None:
        return f"dense + fine-tuning ({ret.summary.get('tokens')} tokens, lr {ret.summary.get('config', {}).get('lr')})"
    parts = []
    if pr is not None:
        parts.append(f"{pr.summary.get('criterion')} {pr.summary.get('pattern')}")
    if rc is not None and rc.status == "done":
        c = rc.summary.get("config", {})
        parts.append(f"+ {c.get('window')} reconstruction ({c.get('peft')}, lr {c.get('lr')}, {c.get('epochs')} ep)")
    if ret is not None:
        c = ret.summary.get("config", {})
        parts.append(f"+ retraining ({c.get('peft') or 'full'}, {ret.summary.get('tokens')} tokens, lr {c.get('lr')})")
    return " ".join(parts)


def short_labels(runs: list[Path]) -> list[str]:
    """Run names without the prefix and suffix they all share (at a `-`, `_` or `.`), so tables and plots stay narrow.

    `c128-wanda--lr1e-3` and `c128-wanda--lr1e-4` become `lr1e-3` and `lr1e-4`; a single run keeps its name.
    """
    names = [Path(r).resolve().name for r in runs]
    if len(set(names)) < 2:
        return names

    def cut(strings: list[str]) -> int:
        n = 0
        for chars in zip(*strings):
            if len(set(chars)) > 1:
                break
            n += 1
        while n and strings[0][n - 1] not in "-_.":
            n -= 1  # back to a separator, so no label starts mid-word
        return n

    head = cut(names)
    names = [n[head:] for n in names]
    tail = cut([n[::-1] for n in names])
    names = [n[: len(n) - tail] if tail else n for n in names]
    return [n.strip("-_.") or Path(r).resolve().name for n, r in zip(names, runs)]


def compare(runs: list[Path]) -> dict:
    """Rows: the dense baseline (once per distinct dense model), then each run's pruned, reconstructed, retrained and
    quantized models.

    A pruned model shared by several runs (the same prune run, e.g. work directories cloned after pruning)
    is listed once, under the first run that has it.
    """
    if not runs:
        raise FreelunchError("--compare needs at least one work directory")
    rows, seen_dense, seen_pruned = [], set(), set()
    for root, label in zip(runs, short_labels(runs)):
        work = WorkDir(root)
        if not work.exists():
            raise FreelunchError(f"{root} is not a freelunch work directory (no manifest.json)")
        cal = work.stage("calibrate")
        dense = stage_results(work, "dense") if cal is not None and cal.run_id not in seen_dense else {}
        if dense:
            seen_dense.add(cal.run_id)
            rows.insert(
                len(seen_dense) - 1, {"run": str(root), "label": label, "model": "dense", "what": "dense", "metrics": dense}
            )
        for stage in ("pruned", "reconstructed", "retrained", "quantized"):
            m = stage_results(work, stage)
            if not m:
                continue
            if stage == "pruned":
                prune_run = work.stage("prune").run_id
                if prune_run in seen_pruned:
                    continue
                seen_pruned.add(prune_run)
            rows.append({"run": str(root), "label": label, "model": stage, "what": describe(work, stage), "metrics": m})
    if not rows:
        raise FreelunchError("no evaluation results in these runs: run `freelunch eval` on them first")
    columns = sorted({k for r in rows for k in r["metrics"]}, key=lambda k: (not k.startswith("ppl"), k))
    return {"columns": columns, "rows": rows}


def window_records(runs: list[Path]) -> list[tuple[str, str, list[dict]]]:
    """(label, window granularity, window records in model order) of each run whose reconstruction finished."""
    out = []
    for root, label in zip(runs, short_labels(runs)):
        work = WorkDir(root)
        st = work.stage("reconstruct")
        if st is None or st.status != "done":
            continue
        total = work.progress("reconstruct").get("windows_total", 0)
        recs = [read_json(work.window_record_path(i)) for i in range(total) if work.window_record_path(i).exists()]
        if recs:
            out.append((label, st.summary.get("window"), recs))
    return out


def to_markdown(table: dict) -> str:
    cols = table["columns"]
    lines = ["| run | model | " + " | ".join(cols) + " |", "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for r in table["rows"]:
        cells = [
            f"{r['metrics'][c]:.3f}"
            if c.startswith("ppl") and c in r["metrics"]
            else f"{r['metrics'][c]:.4f}"
            if c in r["metrics"]
            else "-"
            for c in cols
        ]
        lines.append(f"| {r['label']} | {r['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(table: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "compare.md", out / "compare.json"
    write_bytes_atomic(md, to_markdown(table).encode())
    write_json_atomic(js, json.loads(json.dumps(table)))
    return md, js


def report(runs: list[Path], out: Path, plot: bool, rep) -> dict:
    """`eval --compare` / `--plot`: the table (printed, Markdown, JSON) and, on request, the pictures."""
    table = compare(runs)
    md, js = write_comparison(table, out)
    cols = table["columns"]
    rep.table(
        "comparison",
        ["run", "model", *cols],
        [[r["label"], r["what"], *[f"{r['metrics'][c]:.4g}" if c in r["metrics"] else "-" for c in cols]] for r in table["rows"]],
    )
    files = [str(md), str(js)]
    if plot:
        from freelunch_cli.evaluation.plots import perplexity_bars, window_losses

        files += [str(p) for p in (window_losses(window_records(runs), out), perplexity_bars(table, out)) if p is not None]
    rep.summary(f"compared {len(runs)} run(s): {', '.join(files)}", {**table, "files": files})
    return {**table, "files": files}

"""Pictures of runs: per-window reconstruction loss before and after, and perplexity per run."""

from __future__ import annotations

from pathlib import Path

from freelunch_cli.errors import FreelunchError
from freelunch_cli.storage import read_json
from freelunch_cli.workdir import WorkDir


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FreelunchError("--plot needs matplotlib: pip install 'freelunch-cli[plots]'") from None
    return plt


def window_losses(runs: list[Path], out: Path) -> Path | None:
    """Loss before and after reconstruction of every window, one panel per run (log scale)."""
    plt = _pyplot()
    data = []
    for root in runs:
        work = WorkDir(root)
        st = work.stage("reconstruct")
        if st is None or st.status != "done":
            continue
        recs = [read_json(p) for p in sorted((work.root / "windows").glob("[0-9][0-9][0-9].json"))]
        if recs:
            data.append((Path(root).name, st.summary.get("window"), recs))
    if not data:
        return None
    fig, axes = plt.subplots(len(data), 1, figsize=(9, 3.2 * len(data)), squeeze=False)
    for ax, (name, window, recs) in zip(axes[:, 0], data):
        x = list(range(len(recs)))
        ax.plot(x, [r["loss_before"] for r in recs], "o-", color="tab:red", label="pruned (before)", markersize=3)
        ax.plot(x, [r["loss_after"] for r in recs], "o-", color="tab:green", label="reconstructed (after)", markersize=3)
        ax.set_yscale("log")
        ax.set_title(f"{name}: reconstruction loss per {window} window")
        ax.set_xlabel("window (model order)")
        ax.set_ylabel("loss vs dense target")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "window_losses.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def perplexity_bars(table: dict, out: Path) -> Path | None:
    """One bar per model and perplexity metric (log scale), dense baseline first."""
    plt = _pyplot()
    cols = [c for c in table["columns"] if c.startswith("ppl")]
    if not cols:
        return None
    rows = table["rows"]
    fig, axes = plt.subplots(1, len(cols), figsize=(max(6, 1.2 * len(rows) + 3) * len(cols), 4.5), squeeze=False)
    colors = {"dense": "tab:blue", "pruned": "tab:red", "reconstructed": "tab:green", "retrained": "tab:purple"}
    for ax, col in zip(axes[0], cols):
        vals = [(f"{Path(r['run']).name}\n{r['model']}", r["metrics"].get(col), colors[r["model"]]) for r in rows if col in r["metrics"]]
        bars = ax.bar(range(len(vals)), [v[1] for v in vals], color=[v[2] for v in vals])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v[1]:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(vals)), [v[0] for v in vals], rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(col)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path = out / "perplexity.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

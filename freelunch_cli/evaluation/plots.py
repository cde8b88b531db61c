"""Pictures of runs: per-window reconstruction loss before and after, and perplexity per run (matplotlib).

Pure drawing: ``evaluation.compare`` gathers what is drawn."""

from __future__ import annotations

from pathlib import Path

from freelunch_cli.core.errors import FreelunchError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FreelunchError("--plot needs matplotlib: pip install 'freelunch-cli[plots]'") from None
    return plt


def window_losses(runs: list[tuple[str, str, list[dict]]], out: Path) -> Path | None:
    """Loss before and after reconstruction of every window, one panel per run (log scale).

    ``runs``: (label, window granularity, window records in model order) of each reconstructed run.
    """
    if not runs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.2 * len(runs)), squeeze=False)
    for ax, (name, window, recs) in zip(axes[:, 0], runs):
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
    """Horizontal bars, one panel per perplexity metric stacked vertically, dense baseline on top.

    Labels are the runs' short names; the axis turns logarithmic only when values span more than 20x
    (random pruning), so ordinary comparisons read on a linear scale with the dense value as a dashed line.
    """
    plt = _pyplot()
    cols = [c for c in table["columns"] if c.startswith("ppl")]
    if not cols:
        return None
    colors = {"dense": "tab:blue", "pruned": "tab:red", "reconstructed": "tab:green", "retrained": "tab:purple"}
    panels = [
        (
            col,
            [
                (f"{r['label']} · {r['model']}" if r["model"] != "dense" else "dense", r["metrics"][col], colors[r["model"]])
                for r in table["rows"]
                if col in r["metrics"]
            ],
        )
        for col in cols
    ]
    heights = [0.8 + 0.35 * len(vals) for _, vals in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(9, sum(heights) + 0.4), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, (col, vals) in zip(axes[:, 0], panels):
        y = list(range(len(vals)))[::-1]
        ax.barh(y, [v[1] for v in vals], color=[v[2] for v in vals], height=0.7)
        ax.set_yticks(y, [v[0] for v in vals], fontsize=9)
        top = max(v[1] for v in vals)
        if top / min(v[1] for v in vals) > 20:
            ax.set_xscale("log")
        for yy, v in zip(y, vals):
            ax.annotate(f" {v[1]:.4g}", (v[1], yy), va="center", fontsize=8)
        ax.set_xlim(right=top * (3 if ax.get_xscale() == "log" else 1.12))
        dense = [v[1] for v in vals if v[0] == "dense"]
        if dense:
            ax.axvline(dense[0], color="tab:blue", linestyle="--", linewidth=1)
        ax.set_title(f"{col} (lower is better)", fontsize=10)
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    path = out / "perplexity.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Training curves as a PNG (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(history: list[dict[str, Any]], path: Path, primary: str) -> Path | None:
    """Plot train/val loss and the task's primary metric against optimizer steps."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    metric_key = f"val_{primary}"
    has_metric = primary != "loss" and any(metric_key in r for r in history)
    fig, axes = plt.subplots(1, 2 if has_metric else 1, figsize=(10 if has_metric else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r.get("train_loss") for r in history], label="train loss", marker=".")
    if any("val_loss" in r for r in history):
        ax.plot(steps, [r.get("val_loss") for r in history], label="val loss", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_metric:
        ax = axes[0][1]
        ax.plot(steps, [r.get(metric_key) for r in history], label=metric_key, color="tab:green", marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel(primary)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

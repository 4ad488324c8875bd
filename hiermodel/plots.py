"""PNG plots of training curves and λ (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAX_LEGEND = 10


def plot_series(
    path: Path,
    *,
    x: Sequence[float],
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    xlabel: str,
    title: str = "",
) -> Path:
    """One panel per entry of ``panels`` (title -> {line label -> values}), sharing the x axis."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        for label, values in lines.items():
            ax.plot(list(x)[: len(values)], list(values), marker="o", markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if 1 < len(lines) <= MAX_LEGEND:  # dozens of sites: the lines still show the spread, a legend would hide it
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(path: Path, history: Sequence[Mapping[str, float]]) -> Path:
    """Loss, validation metrics and λ per epoch."""
    epochs = [row["epoch"] for row in history]
    lambdas = {k.removeprefix("lambda_"): [r[k] for r in history] for k in history[0] if k.startswith("lambda_")}
    metrics = {k.removeprefix("val_"): [r[k] for r in history] for k in ("val_ndcg@10", "val_recall@20", "val_explore_recall@20") if k in history[0]}
    return plot_series(
        path,
        x=epochs,
        panels={"training loss": {"loss": [r["loss"] for r in history]}, "validation": metrics, "λ per level": lambdas},
        xlabel="epoch",
    )

"""Curves of a run as PNGs: the loss (training per step, validation per evaluation) or any
logged metric, such as the mean reward of the online recipes."""

from __future__ import annotations

from pathlib import Path


def plot_loss(history: list[dict], path: Path, title: str = "") -> Path | None:
    """Write ``path`` from metrics records; returns None when there is nothing to plot."""
    return plot_metric(history, "loss", path, ylabel="loss (nats / trained token)",
                       title=title or "training loss")


def plot_metric(history: list[dict], key: str, path: Path, *, ylabel: str,
                title: str = "") -> Path | None:
    """``key`` per training step (with a moving mean) and ``val_<key>`` per evaluation."""
    train = [(r["step"], r[key]) for r in history if key in r]
    val = [(r["step"], r[f"val_{key}"]) for r in history if f"val_{key}" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, color="#9ab", lw=1, label=f"train {key}")
        if len(values) >= 10:
            k = max(2, len(values) // 20)
            smooth = [sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, color="#1f4e79", lw=2, label=f"train {key} ({k}-step mean)")
    if val:
        steps, values = zip(*val)
        ax.plot(steps, values, "o-", color="#c0392b", lw=2, label=f"validation {key}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

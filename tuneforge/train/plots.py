"""The loss curve of a run as a PNG (training loss per step, validation loss per evaluation)."""

from __future__ import annotations

from pathlib import Path


def plot_loss(history: list[dict], path: Path, title: str = "") -> Path | None:
    """Write ``path`` from metrics records; returns None when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ab", lw=1, label="train loss")
        if len(losses) >= 10:
            k = max(2, len(losses) // 20)
            smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, color="#1f4e79", lw=2, label=f"train loss ({k}-step mean)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="#c0392b", lw=2, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / trained token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

"""The loss curve of a run, drawn from the Trainer's log history."""

from __future__ import annotations

from pathlib import Path


def plot_loss(log_history: list[dict], path: str | Path, title: str = "training loss") -> Path:
    """Training loss (and evaluation loss, when logged) against the optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        axes.plot(*zip(*train), label="train loss", color="tab:blue")
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="eval loss", color="tab:orange")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy per answer token")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if train or evaluation:
        axes.legend()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path

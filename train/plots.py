"""The loss curve of a run, drawn from the Trainer's log history."""

from __future__ import annotations

from pathlib import Path

from avlabel.core.charts import png_bytes


def plot_loss(log_history: list[dict], path: str | Path, title: str = "training loss") -> Path:
    """Training loss (and evaluation loss, when logged) against the optimizer step, as a PNG."""
    from matplotlib.figure import Figure

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure = Figure(figsize=(7, 4), dpi=120)
    axes = figure.subplots()
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
    path.write_bytes(png_bytes(figure, dpi=120))
    return path

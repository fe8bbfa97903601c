"""What the train stage leaves beside the best checkpoint: metrics, the evaluation history as CSV,
loss curves as PNG (rendered offline with matplotlib's Agg backend) and the params it trained with."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lstm_textgen.files import atomic_path, write_json, write_text
from lstm_textgen.params import Params

if TYPE_CHECKING:
    from lstm_textgen.train.loop import TrainResult


def plot_losses(history: Sequence[dict[str, float]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [h["train_loss"] for h in history], label="train", marker=".")
    ax.plot(steps, [h["val_loss"] for h in history], label="validation", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def history_csv(history: Sequence[dict[str, float]]) -> str:
    """The periodic evaluations as CSV (DVC's plots read it), one row per evaluation."""
    columns = list(history[0])
    rows = [",".join(columns)] + [",".join(f"{h[c]:.6g}" for c in columns) for h in history]
    return "\n".join(rows) + "\n"


def write_outputs(
    result: TrainResult, metrics: dict[str, Any], params: Params, *, title: str, out: Path, metrics_dir: Path
) -> None:
    """The train stage's outputs beside the best checkpoint: metrics/train.json, the history as CSV,
    the loss curves as PNG and the params the model was trained with. Each file is written whole
    (a temporary file renamed), so a crash leaves no half-written one."""
    write_json(metrics_dir / "train.json", metrics)
    write_text(metrics_dir / "train_history.csv", history_csv(result.history))
    with atomic_path(out / "loss.png", suffix=".png") as tmp:
        plot_losses(result.history, tmp, title=title)
    write_text(out / "params.yaml", yaml.safe_dump(params.model_dump(), sort_keys=False))

"""`lstm-textgen compare` (`make compare`): a table of the runs in the MLflow store, side by side, as
text or Markdown, and a plot of validation loss against training time for chosen runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from lstm_textgen.files import atomic_path, write_text
from lstm_textgen.tracking import store

COLUMNS = {
    "run": "tags.mlflow.runName",
    "experiment": "tags.dvc_experiment",
    "status": "status",
    "corpus": "tags.corpus",
    "level": "params.data.level",
    "cell": "params.model.cell",
    "input": "params.model.input",
    "layers": "params.model.layers",
    "hidden": "params.model.hidden",
    "objective": "params.train.objective",
    "parameters": "metrics.parameters",
    "steps": "metrics.final_steps",
    "val_loss": "metrics.eval.val.loss",
    "val_bpt": "metrics.eval.val.bits_per_token",
    "val_bpc": "metrics.eval.val.bits_per_character",  # compares runs at different levels
    "test_loss": "metrics.eval.test.loss",
    "tokens_per_sec": "metrics.final_tokens_per_sec",
    "train_s": "metrics.final_train_seconds",
}


def runs_table(max_runs: int = 100) -> pd.DataFrame:
    mlflow = store.configure()
    runs = mlflow.search_runs(experiment_names=[store.experiment_name()], max_results=max_runs)
    table = pd.DataFrame({name: runs.get(col) for name, col in COLUMNS.items()})
    table.insert(0, "run_id", runs.get("run_id", []))
    if len(runs):
        table["duration_s"] = (runs["end_time"] - runs["start_time"]).dt.total_seconds().round(1)
    return table


def to_markdown(table: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return ""
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def plot_val_loss_vs_time(run_ids: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    store.configure()
    client = MlflowClient()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for run_id in run_ids:
        run = client.get_run(run_id)
        seconds = {m.step: m.value for m in client.get_metric_history(run_id, "train_seconds")}
        points = sorted(
            (seconds[m.step], m.value)
            for m in client.get_metric_history(run_id, "val_loss")
            if m.step in seconds
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=run.info.run_name or run_id[:8])
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lstm-textgen compare", description=__doc__)
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    parser.add_argument("--plot", type=Path, help="write validation loss against training time as PNG")
    parser.add_argument("--runs", help="comma-separated run ids or names to plot (default: all finished)")
    parser.add_argument("--max-runs", type=int, default=100)
    args = parser.parse_args(argv)
    table = runs_table(args.max_runs)
    if table.empty:
        print(f"no runs yet in {store.tracking_uri()} (run `make repro` first)")
        return
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 4):
        print(table.drop(columns=["run_id"]).to_string(index=False))
    if args.markdown:
        write_text(args.markdown, to_markdown(table))
        print(f"wrote {args.markdown}")
    if args.plot:
        chosen = table[table["status"] == "FINISHED"]
        if args.runs:
            wanted = set(args.runs.split(","))
            chosen = table[table["run_id"].isin(wanted) | table["run"].isin(wanted)]
        plot_val_loss_vs_time(list(chosen["run_id"]), args.plot)
        print(f"wrote {args.plot}")

"""DVC stage `train`: data/prepared -> data/model/model.pt (best checkpoint), metrics/train.json,
metrics/train_history.csv and one MLflow run with params, curves and artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
import yaml

from lstm_textgen import tracking
from lstm_textgen.cli import run_main
from lstm_textgen.dataset import load_dataset
from lstm_textgen.devices import resolve_device
from lstm_textgen.files import atomic_path, read_json, write_json, write_text
from lstm_textgen.params import flatten, load_params
from lstm_textgen.plots import plot_losses
from lstm_textgen.training import train


def log_evaluation(record: dict[str, float]) -> None:
    """Each periodic evaluation becomes a point of the run's curves in MLflow."""
    mlflow.log_metrics({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--corpus-info", type=Path, default=Path("data/raw/corpus.json"))
    parser.add_argument("--out", type=Path, default=Path("data/model"))
    parser.add_argument("--resume-from", type=Path, default=Path("data/checkpoints/last.pt"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics"))
    args = parser.parse_args()

    params = load_params(args.params)
    dataset = load_dataset(args.prepared)
    corpus = read_json(args.corpus_info)
    device = resolve_device(params.train.device).type
    logged = {
        **flatten(params.model_dump(include={"data", "model", "train"})),
        **flatten({"corpus": corpus.get("spec", {})}),  # how the download stage read the corpus
        "vocab_size": len(dataset.vocab),
    }
    tags = {**tracking.run_tags(corpus, device), "mlflow.note.content": tracking.run_description()}
    with tracking.active_run(run_name=tracking.run_name(), tags=tags) as run:
        mlflow.log_params({k: str(v) for k, v in logged.items()})
        result = train(
            dataset.splits,
            dataset.vocab,
            params,
            best_path=args.out / "model.pt",
            last_path=args.resume_from,
            on_eval=log_evaluation,
        )
        metrics = {**result.metrics(), "mlflow_run_id": run.info.run_id}
        numeric = {f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        mlflow.log_metrics(numeric)
        mlflow.log_metric("parameters", result.parameters)
        mlflow.set_tags({"dtype": result.dtype, "stopped": result.stopped})

        write_json(args.metrics / "train.json", metrics)
        columns = list(result.history[0])
        rows = [",".join(columns)] + [",".join(f"{h[c]:.6g}" for c in columns) for h in result.history]
        write_text(args.metrics / "train_history.csv", "\n".join(rows) + "\n")
        with atomic_path(args.out / "loss.png", suffix=".png") as tmp:
            plot_losses(
                result.history,
                tmp,
                title=f"{corpus.get('name')}: {params.model.cell} "
                f"{params.model.layers}x{params.model.hidden}",
            )
        write_text(args.out / "params.yaml", yaml.safe_dump(params.model_dump(), sort_keys=False))
        for artifact in ("loss.png", "params.yaml"):
            mlflow.log_artifact(str(args.out / artifact))
        mlflow.log_artifact(str(args.prepared / "vocab.json"))
    print(
        f"train: best periodic val loss {result.window_val_loss_best:.4f} at step {result.best_step}, "
        f"{result.tokens_per_sec:,.0f} tokens/s on {result.device} ({result.dtype}), "
        f"{result.train_seconds:.0f} s; MLflow run {metrics['mlflow_run_id']}"
    )


if __name__ == "__main__":
    run_main(main)

"""DVC stage `train`: data/prepared -> data/model/model.pt (best checkpoint), metrics/train.json,
metrics/train_history.csv and one MLflow run with params, curves and artifacts.

Also the entry point of distributed training: `train.processes: N` starts N local workers running
this script; `torchrun ... stages/train.py` on several machines runs it as one job. Every rank trains;
rank 0 alone logs to MLflow and writes the outputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lstm_textgen.errors import run_main
from lstm_textgen.params import Params, load_params
from lstm_textgen.tracking.training import Hooks, Trained, TrainingFiles, run_training
from lstm_textgen.train.outputs import write_outputs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--corpus-info", type=Path, default=Path("data/raw/corpus.json"))
    parser.add_argument("--init", type=Path, default=Path("data/init"))
    parser.add_argument("--out", type=Path, default=Path("data/model"))
    parser.add_argument("--resume-from", type=Path, default=Path("data/checkpoints/last.pt"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics"))
    return parser.parse_args()


def write_stage_outputs(trained: Trained, params: Params, args: argparse.Namespace) -> None:
    """metrics/, the loss plot and the run's final figures and artifacts."""
    result, run = trained.result, trained.run
    metrics = run.finish(result)
    title = f"{trained.corpus.get('name')}: {params.model.cell} {params.model.layers}x{params.model.hidden}"
    write_outputs(result, metrics, params, title=title, out=args.out, metrics_dir=args.metrics)
    run.log_artifacts([args.out / "loss.png", args.out / "params.yaml", args.prepared / "vocab.json"])
    print(f"train: {result.summary()}; MLflow run {run.run_id}")


def main() -> None:
    args = parse_args()
    params = load_params(args.params)
    files = TrainingFiles(
        prepared=args.prepared,
        corpus_info=args.corpus_info,
        init=args.init,
        best=args.out / "model.pt",
        last=args.resume_from,
    )
    hooks = Hooks(
        finished=lambda trained: write_stage_outputs(trained, params, args),
        launch=[__file__, *sys.argv[1:]],
    )
    run_training(params, files, hooks=hooks)


if __name__ == "__main__":
    run_main(main)

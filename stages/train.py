"""DVC stage `train`: data/prepared -> data/model/model.pt (best checkpoint), metrics/train.json,
metrics/train_history.csv and one MLflow run with params, curves and artifacts.

Also the entry point of distributed training: `train.processes: N` starts N local workers running
this script; `torchrun ... stages/train.py` on several machines runs it as one job. Every rank trains;
rank 0 alone logs to MLflow and writes the outputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lstm_textgen.data.dataset import load_dataset
from lstm_textgen.errors import run_main
from lstm_textgen.files import read_json
from lstm_textgen.params import load_params
from lstm_textgen.tracking import store
from lstm_textgen.tracking.training_run import training_run
from lstm_textgen.train.checkpointer import Checkpointer
from lstm_textgen.train.distributed import DistributedError, World, launch_local
from lstm_textgen.train.finetune import initial_weights, source_lineage
from lstm_textgen.train.loop import train
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


def main() -> None:
    args = parse_args()
    params, world = load_params(args.params), World.from_env()
    dataset = load_dataset(args.prepared)  # a missing or bad split fails here, once, before any worker
    if not world.launched and params.train.processes > 1:
        try:
            launch_local(params.train.processes, [__file__, *sys.argv[1:]], params.train.device)
        except DistributedError as failed:  # a worker died: the others were stopped as if by a user
            store.fail_launched_runs(str(failed))
            raise
        return
    checkpointer = Checkpointer(args.out / "model.pt", args.resume_from)
    saved = checkpointer.load_resumable(params, dataset.vocab) if params.train.resume else None
    start = initial_weights(args.init, params, dataset.vocab)
    lineage = source_lineage(args.init, len(dataset.vocab)) if start is not None else {}
    corpus = read_json(args.corpus_info)
    with (
        world.running(params.train.device) as device,
        training_run(params, corpus, len(dataset.vocab), device, world, saved, lineage) as run,
    ):
        result = train(
            dataset.splits,
            dataset.vocab,
            params,
            checkpointer.best_path,
            checkpointer.last_path,
            on_eval=run.log_evaluation,
            world=world,
            labels=run.labels,
            initial_weights=start,
            saved=saved,
        )
        if world.is_main:
            metrics = run.finish(result)
            title = f"{corpus.get('name')}: {params.model.cell} {params.model.layers}x{params.model.hidden}"
            write_outputs(result, metrics, params, title, args.out, args.metrics)
            run.log_artifacts([args.out / "loss.png", args.out / "params.yaml", args.prepared / "vocab.json"])
            print(f"train: {result.summary()}; MLflow run {run.run_id}")


if __name__ == "__main__":
    run_main(main)

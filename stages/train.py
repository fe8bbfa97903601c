"""DVC stage `train`: data/prepared -> data/model/model.pt (best checkpoint), metrics/train.json,
metrics/train_history.csv and one MLflow run with params, curves and artifacts.

Also the entry point of distributed training: `train.processes: N` starts N local workers running
this script; `torchrun ... stages/train.py` on several machines runs it as one job. Rank 0 alone
logs to MLflow and writes the outputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml

from lstm_textgen.data.dataset import load_dataset
from lstm_textgen.devices import resolve_device
from lstm_textgen.errors import UserError, run_main
from lstm_textgen.files import atomic_path, read_json, write_json, write_text
from lstm_textgen.params import Params, flatten, load_params
from lstm_textgen.tracking import store
from lstm_textgen.train.distributed import World, launch_local
from lstm_textgen.train.finetune import initial_weights, lineage_note
from lstm_textgen.train.loop import TrainResult, load_resumable, train
from lstm_textgen.train.outputs import plot_losses


def log_evaluation(record: dict[str, float]) -> None:
    """Each periodic evaluation becomes a point of the run's curves in MLflow."""
    mlflow.log_metrics({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))


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
    """One process, or `train.processes` local workers (each runs this script again under torchrun's
    launcher), or one worker of a job started by hand with torchrun (RANK/WORLD_SIZE set)."""
    args = parse_args()
    params = load_params(args.params)
    world = World.from_env()
    if not world.launched and params.train.processes > 1:
        check_processes(params.train.processes, resolve_device(params.train.device))
        load_dataset(args.prepared)  # a missing or bad split fails here, once, not in every worker
        launch_local(params.train.processes, [__file__, *sys.argv[1:]])
        return
    device = world.device(params.train.device)
    world.start(device)
    try:
        if world.is_main:
            with world.peers_watched():
                train_and_log(args, params, world)
        else:
            dataset = load_dataset(args.prepared)
            with world.peers_watched():
                train(
                    dataset.splits,
                    dataset.vocab,
                    params,
                    args.out / "model.pt",
                    args.resume_from,
                    world=world,
                    initial_weights=initial_weights(args.init, params, dataset.vocab),
                )
    finally:
        world.stop()


def check_processes(processes: int, device: torch.device) -> None:
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise UserError(
            f"train.processes: {processes} processes need {processes} GPUs (one each), this machine has "
            f"{torch.cuda.device_count()}; lower train.processes"
        )


def train_and_log(args: argparse.Namespace, params: Params, world: World) -> None:
    """Rank 0 (or the only process): the one MLflow run, the training, the DVC outputs. A resumed
    run continues the MLflow run its checkpoint names, so the curves stay in one run."""
    dataset = load_dataset(args.prepared)
    corpus = read_json(args.corpus_info)
    device = world.device(params.train.device)
    if world.launched and params.train.processes not in (1, world.world_size):
        print(f"train: started by torchrun with {world.world_size} processes; train.processes is not used")
    for run_id in store.close_abandoned_runs():
        print(f"train: MLflow run {run_id} was left RUNNING by a process that is gone; marked KILLED")
    saved = load_resumable(args.resume_from, params, dataset.vocab) if params.train.resume else None
    start = initial_weights(args.init, params, dataset.vocab)
    lineage = read_json(args.init / "source.json") if start is not None else {}
    if start is not None:  # how many tokens the source model had never seen
        lineage["init_added_tokens"] = str(len(dataset.vocab) - int(lineage["init_from_vocab_size"]))
    logged = {
        **flatten(params.model_dump(include={"data", "model", "train"})),
        **flatten({"corpus": corpus.get("spec", {})}),  # how the download stage read the corpus
        "vocab_size": len(dataset.vocab),
    }
    tags = {
        **store.run_tags(corpus, device.type),
        "world_size": str(world.world_size),
        "backend": world.backend(device) if world.launched else "none",
        "mlflow.note.content": "\n\n".join(
            [store.run_description(), *([lineage_note(lineage)] if lineage else [])]
        ),
        **lineage,
    }
    run_id = store.existing_run((saved or {}).get("labels", {}).get("mlflow_run_id"))
    with store.active_run(run_id=run_id, run_name=None if run_id else store.run_name()) as run:
        if saved is None:
            mlflow.log_params({k: str(v) for k, v in logged.items()})
        else:
            continue_run(run.info.run_id, saved, logged, tags)
        mlflow.set_tags(tags)
        result = train(
            dataset.splits,
            dataset.vocab,
            params,
            best_path=args.out / "model.pt",
            last_path=args.resume_from,
            on_eval=log_evaluation,
            world=world,
            labels={"mlflow_run_id": run.info.run_id},
            initial_weights=start,
        )
        metrics = {**result.metrics(), "mlflow_run_id": run.info.run_id}
        numeric = {f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        mlflow.log_metrics(numeric)
        mlflow.log_metric("parameters", result.parameters)
        mlflow.set_tags({"dtype": result.dtype, "stopped": result.stopped})
        write_outputs(args, params, corpus, result, metrics)
        for artifact in ("loss.png", "params.yaml"):
            mlflow.log_artifact(str(args.out / artifact))
        mlflow.log_artifact(str(args.prepared / "vocab.json"))
    processes = f" x {result.processes} processes" if result.processes > 1 else ""
    print(
        f"train: best periodic val loss {result.window_val_loss_best:.4f} at step {result.best_step}, "
        f"{result.tokens_per_sec:,.0f} tokens/s on {result.device}{processes} ({result.dtype}), "
        f"{result.train_seconds:.0f} s; MLflow run {metrics['mlflow_run_id']}"
    )


def continue_run(run_id: str, saved: dict[str, Any], logged: dict[str, Any], tags: dict[str, str]) -> None:
    """Reopening a run to resume it: params it lacks (a run cannot change a param's value; the
    resumable changes such as `train.resume` are tagged instead), and the evaluations the
    checkpoint holds that never reached MLflow (a kill between the checkpoint and the log)."""
    run = mlflow.MlflowClient().get_run(run_id)
    mlflow.log_params({k: str(v) for k, v in logged.items() if k not in run.data.params})
    changed = sorted(k for k, v in logged.items() if k in run.data.params and run.data.params[k] != str(v))
    tags["resumed_at_step"] = str(saved["step"])
    tags["resumed_with"] = ", ".join(f"{k}={logged[k]}" for k in changed) or "the same params"
    logged_steps = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_loss")}
    for record in saved["history"]:
        if int(record["step"]) not in logged_steps:
            log_evaluation(record)
    print(f"train: continuing MLflow run {run_id} from step {saved['step']}")


def write_outputs(
    args: argparse.Namespace,
    params: Params,
    corpus: dict[str, Any],
    result: TrainResult,
    metrics: dict[str, Any],
) -> None:
    write_json(args.metrics / "train.json", metrics)
    columns = list(result.history[0])
    rows = [",".join(columns)] + [",".join(f"{h[c]:.6g}" for c in columns) for h in result.history]
    write_text(args.metrics / "train_history.csv", "\n".join(rows) + "\n")
    with atomic_path(args.out / "loss.png", suffix=".png") as tmp:
        plot_losses(
            result.history,
            tmp,
            title=f"{corpus.get('name')}: {params.model.cell} {params.model.layers}x{params.model.hidden}",
        )
    write_text(args.out / "params.yaml", yaml.safe_dump(params.model_dump(), sort_keys=False))


if __name__ == "__main__":
    run_main(main)

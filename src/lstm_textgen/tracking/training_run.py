"""The train stage's MLflow run, from start to finish: runs left RUNNING by a dead process closed,
params and tags (owner, corpus, device, world, fine-tuning lineage) logged, a resumed run re-opened
with the evaluations its checkpoint holds that never reached MLflow, each periodic evaluation logged
as a point of the curves, and the final figures and artifacts.

Only rank 0 of a distributed run logs; the other ranks get a `TrainingRun` that logs nothing, so the
training loop is called the same way on every rank."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lstm_textgen.params import Params, flatten
from lstm_textgen.tracking import store

if TYPE_CHECKING:
    import torch

    from lstm_textgen.train.distributed import World
    from lstm_textgen.train.loop import TrainResult


@dataclass(frozen=True)
class TrainingRun:
    """The open run (`run_id` None on the ranks that do not log)."""

    run_id: str | None = None

    @property
    def labels(self) -> dict[str, str]:
        """What the checkpoints carry, so that a resumed run finds its MLflow run again."""
        return {"mlflow_run_id": self.run_id} if self.run_id else {}

    def log_evaluation(self, record: dict[str, float]) -> None:
        """Each periodic evaluation becomes a point of the run's curves in MLflow."""
        if self.run_id:
            import mlflow

            mlflow.log_metrics({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def finish(self, result: TrainResult) -> dict[str, Any]:
        """The final figures as metrics and tags; returns them with the run id (metrics/train.json)."""
        import mlflow

        metrics = {**result.metrics(), "mlflow_run_id": self.run_id}
        mlflow.log_metrics(
            {f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        )
        mlflow.log_metric("parameters", result.parameters)
        mlflow.set_tags({"dtype": result.precision(), "stopped": result.stopped})
        return metrics

    def log_artifacts(self, paths: list[Path]) -> None:
        import mlflow

        for path in paths:
            mlflow.log_artifact(str(path))


def logged_params(params: Params, corpus: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    return {
        **flatten(params.model_dump(include={"data", "model", "train"})),
        **flatten({"corpus": corpus.get("spec", {})}),  # how the download stage read the corpus
        "vocab_size": vocab_size,
    }


def run_tags(
    corpus: dict[str, Any], device: torch.device, world: World, lineage: dict[str, str]
) -> dict[str, str]:
    return {
        **store.run_tags(corpus, device.type),
        "world_size": str(world.world_size),
        "backend": world.backend(device) if world.launched else "none",
        "mlflow.note.content": "\n\n".join(
            [store.run_description(), *([lineage_note(lineage)] if lineage else [])]
        ),
        **lineage,
    }


def lineage_note(lineage: dict[str, str]) -> str:
    """A line for the run's description in the MLflow UI, with a link to the source."""
    if "init_from_model" in lineage:
        name, version = lineage["init_from_model"], lineage["init_from_version"]
        return f"Fine-tuned from [{name} version {version}](#/models/{name}/versions/{version})."
    if lineage.get("init_from_run_id"):
        return f"Fine-tuned from the model of run `{lineage['init_from_run_id']}`."
    digest = lineage["init_from_sha256"][:12]
    return f"Fine-tuned from the checkpoint `{lineage['init_from']}` (sha256 {digest})."


@contextmanager
def training_run(
    params: Params,
    corpus: dict[str, Any],
    vocab_size: int,
    device: torch.device,
    world: World,
    saved: dict[str, Any] | None,
    lineage: dict[str, str],
) -> Iterator[TrainingRun]:
    """The run this training logs to: a new one, or the one the resumed checkpoint (`saved`) names.
    A failure inside marks it failed (`store.active_run`)."""
    if not world.is_main:
        yield TrainingRun()
        return
    if world.launched and params.train.processes not in (1, world.world_size):
        print(f"train: started by torchrun with {world.world_size} processes; train.processes is not used")
    for run_id in store.close_abandoned_runs():
        print(f"train: MLflow run {run_id} was left RUNNING by a process that is gone; marked KILLED")
    logged = logged_params(params, corpus, vocab_size)
    tags = run_tags(corpus, device, world, lineage)
    run_id = store.existing_run((saved or {}).get("labels", {}).get("mlflow_run_id"))
    with store.active_run(run_id=run_id, run_name=None if run_id else store.run_name()) as run:
        import mlflow

        if saved is None:
            mlflow.log_params({k: str(v) for k, v in logged.items()})
        else:
            continue_run(TrainingRun(run.info.run_id), saved, logged, tags)
        mlflow.set_tags(tags)
        yield TrainingRun(run.info.run_id)


def continue_run(
    run: TrainingRun, saved: dict[str, Any], logged: dict[str, Any], tags: dict[str, str]
) -> None:
    """Reopening a run to resume it: params it lacks (a run cannot change a param's value; the
    resumable changes such as `train.resume` are tagged instead), and the evaluations the
    checkpoint holds that never reached MLflow (a kill between the checkpoint and the log)."""
    import mlflow

    client = mlflow.MlflowClient()
    existing = client.get_run(run.run_id).data.params
    mlflow.log_params({k: str(v) for k, v in logged.items() if k not in existing})
    changed = sorted(k for k, v in logged.items() if k in existing and existing[k] != str(v))
    tags["resumed_at_step"] = str(saved["step"])
    tags["resumed_with"] = ", ".join(f"{k}={logged[k]}" for k in changed) or "the same params"
    logged_steps = {m.step for m in client.get_metric_history(run.run_id, "val_loss")}
    for record in saved["history"]:
        if int(record["step"]) not in logged_steps:
            run.log_evaluation(record)
    print(f"train: continuing MLflow run {run.run_id} from step {saved['step']}")

"""The train stage's MLflow run, from start to finish: runs left RUNNING by a dead process closed,
params and tags (owner, corpus, device, world, fine-tuning lineage) logged, a resumed run re-opened
with the evaluations its checkpoint holds that never reached MLflow, each periodic evaluation logged
as a point of the curves, and the final figures and artifacts.

Only rank 0 of a distributed run logs; the other ranks get a `TrainingRun` that logs nothing, so the
training loop is called the same way on every rank."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lstm_textgen.errors import Terminated, UserError, shutting_down
from lstm_textgen.params import Params, flatten
from lstm_textgen.tracking import liveness, run_metadata, store
from lstm_textgen.tracking.outbox import Outbox, describe, send_waiting

if TYPE_CHECKING:
    import torch

    from lstm_textgen.train.distributed import World
    from lstm_textgen.train.setup import TrainResult


@dataclass(frozen=True)
class TrainingRun:
    """The open run (`run_id` None on the ranks that do not log). Everything it logs goes through
    its outbox: training never waits on the store, and nothing is lost while a server is away."""

    run_id: str | None = None
    outbox: Outbox | None = None

    @property
    def labels(self) -> dict[str, str]:
        """What the checkpoints carry, so that a resumed run finds its MLflow run again."""
        return {"mlflow_run_id": self.run_id} if self.run_id else {}

    def log_evaluation(self, record: dict[str, float]) -> None:
        """Each periodic evaluation becomes a point of the run's curves in MLflow."""
        if self.outbox:
            values = {k: v for k, v in record.items() if k != "step"}
            self.outbox.log_metrics(values, step=int(record["step"]))

    def finish(self, result: TrainResult) -> dict[str, Any]:
        """The final figures as metrics and tags; returns them with the run id (metrics/train.json)."""
        assert self.outbox is not None
        metrics = {**result.metrics(), "mlflow_run_id": self.run_id}
        finals = {f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.outbox.log_metrics({**finals, "parameters": result.parameters})
        self.outbox.set_tags({"dtype": result.precision(), "stopped": str(result.stopped)})
        return metrics

    def log_artifacts(self, paths: list[Path]) -> None:
        assert self.outbox is not None
        for path in paths:
            self.outbox.log_artifact(path)


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
        **run_metadata.run_tags(corpus, device.type),
        "world_size": str(world.world_size),
        "backend": world.backend(device) if world.launched else "none",
        "mlflow.note.content": "\n\n".join(
            [run_metadata.run_description(), *([lineage_note(lineage)] if lineage else [])]
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
    *,
    saved: dict[str, Any] | None = None,
    lineage: dict[str, str] | None = None,
    name: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Iterator[TrainingRun]:
    """The run this training logs to: a new one (named `name`, else after the DVC experiment), or
    the one the resumed checkpoint (`saved`) names. `extra_tags` place it, e.g. under a search's
    parent run. A failure inside marks it FAILED, a stop request (Ctrl-C, SIGTERM) KILLED, with the
    reason as its `error` tag."""
    if not world.is_main:
        yield TrainingRun()
        return
    if world.launched and params.train.processes not in (1, world.world_size):
        print(f"train: started by torchrun with {world.world_size} processes; train.processes is not used")
    for run_id in liveness.close_abandoned_runs():
        print(f"train: MLflow run {run_id} was left RUNNING by a process that is gone; marked KILLED")
    logged = logged_params(params, corpus, vocab_size)
    tags = {**run_tags(corpus, device, world, lineage or {}), **liveness.owner_tags(), **(extra_tags or {})}
    run_id = open_run(store.existing_run((saved or {}).get("labels", {}).get("mlflow_run_id")), name)
    outbox = Outbox(run_id, store.pending_dir())
    if saved is None:
        log_params(run_id, logged)
    else:
        continue_run(TrainingRun(run_id, outbox), saved, logged, tags)
    outbox.set_tags(tags)
    with store.retrying_on_our_own(), liveness.heartbeat(run_id), closing(outbox), system_metrics(run_id):
        try:
            yield TrainingRun(run_id, outbox)
        except BaseException as exc:
            shutting_down()
            status = "KILLED" if isinstance(exc, (KeyboardInterrupt, Terminated)) else "FAILED"
            outbox.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
            outbox.end(status)
            print(liveness.failure_note(run_id, status), file=sys.stderr)
            raise
        outbox.end("FINISHED")


def open_run(run_id: str | None, name: str | None = None) -> str:
    """A new run (named after the DVC experiment), or `run_id` reopened. An account that may only
    read is refused here, before any training, with the permission it lacks."""
    mlflow = store.configure()
    client = mlflow.MlflowClient()
    send_waiting(client)
    try:
        if run_id:
            client.update_run(run_id, status="RUNNING")
            return run_id
        experiment = client.get_experiment_by_name(store.experiment_name())
        return client.create_run(
            experiment.experiment_id, run_name=name or run_metadata.run_name()
        ).info.run_id
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "PERMISSION_DENIED":
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        raise UserError(
            f"the account {user!r} may not log runs to the experiment {store.experiment_name()!r} on "
            f"{store.tracking_uri()} (it has READ permission): training needs EDIT; ask the server's "
            "admin (`lstm-textgen server add-user` without --read-only)"
        ) from None


@contextmanager
def closing(outbox: Outbox) -> Iterator[None]:
    """Drain the outbox as the run closes; say clearly what could not be sent and how it will be."""
    try:
        yield
    finally:
        unsent = outbox.close()
        if unsent:
            print(
                f"train: the tracking store {store.tracking_uri()} did not take {describe(unsent)} of run "
                f"{outbox.run_id}; they are kept in {store.pending_dir()} and sent by the next pipeline "
                "command, or now by `lstm-textgen server sync`",
                file=sys.stderr,
            )


def log_params(run_id: str, logged: dict[str, Any]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in logged.items()]
    for start in range(0, len(items), 100):  # MLflow's limit of params per call
        MlflowClient().log_batch(run_id, params=items[start : start + 100])


def continue_run(
    run: TrainingRun, saved: dict[str, Any], logged: dict[str, Any], tags: dict[str, str]
) -> None:
    """Reopening a run to resume it: params it lacks (a run cannot change a param's value; the
    resumable changes such as `train.resume` are tagged instead), and the evaluations the
    checkpoint holds that never reached MLflow (a kill between the checkpoint and the log)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    existing = client.get_run(run.run_id).data.params
    log_params(run.run_id, {k: v for k, v in logged.items() if k not in existing})
    changed = sorted(k for k, v in logged.items() if k in existing and existing[k] != str(v))
    tags["resumed_at_step"] = str(saved["step"])
    tags["resumed_with"] = ", ".join(f"{k}={logged[k]}" for k in changed) or "the same params"
    logged_steps = {m.step for m in client.get_metric_history(run.run_id, "val_loss")}
    for record in saved["history"]:
        if int(record["step"]) not in logged_steps:
            run.log_evaluation(record)
    print(f"train: continuing MLflow run {run.run_id} from step {saved['step']}")


SYSTEM_METRICS_STOP_S = 10.0  # what stopping MLflow's monitor may wait for a store that is away


@contextmanager
def system_metrics(run_id: str) -> Iterator[None]:
    """MLflow's system metrics while the run trains: CPU, memory, disk and network, and the GPU's
    where one is seen, as the run's `system/*` curves every `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`
    seconds (MLflow's default: 10). They are a view of the machine, not the run's points: a store
    that is away costs some of them, and never holds the run's end."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=True)
        monitor.start()
    except Exception as exc:  # e.g. psutil missing: the run goes on without them
        print(f"mlflow: no system metrics for this run ({str(exc)[:200]})", file=sys.stderr)
        yield
        return
    try:
        yield
    finally:
        stopping = threading.Thread(target=monitor.finish, daemon=True)
        stopping.start()
        stopping.join(timeout=SYSTEM_METRICS_STOP_S)

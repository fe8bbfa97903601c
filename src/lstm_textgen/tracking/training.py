"""One training, as every caller runs it: the train stage, each tuning trial, anything else. The same
setup for all: the prepared corpus, the fine-tuning source (`train.init_from`), the workers
(`train.processes`), the checkpointer and resume, the MLflow run. A caller adds what is its own
through `Hooks`: the run's name and tags, a look at each periodic evaluation (a trial's pruning), and
what to do with the result while the run is still open (the stage's outputs, a trial's objective).

Lives in `tracking/` because the MLflow run is part of the setup; the loop itself (`train/loop.py`)
knows nothing of MLflow."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lstm_textgen.data.dataset import Dataset, load_dataset
from lstm_textgen.errors import UserError
from lstm_textgen.files import read_json
from lstm_textgen.params import Params
from lstm_textgen.tracking import liveness
from lstm_textgen.tracking.training_run import TrainingRun, training_run
from lstm_textgen.train.checkpointer import Checkpointer, ResumeError
from lstm_textgen.train.distributed import DistributedError, World, launch_local
from lstm_textgen.train.finetune import initial_weights, source_lineage
from lstm_textgen.train.loop import train
from lstm_textgen.train.setup import TrainResult
from lstm_textgen.train.slurm import Allocation, allocation_from_env, launch_in_allocation

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, kw_only=True)
class TrainingFiles:
    """What a training reads and writes (the train stage's paths by default)."""

    prepared: Path = Path("data/prepared")
    corpus_info: Path = Path("data/raw/corpus.json")
    init: Path = Path("data/init")  # the fine-tuning source the init stage resolved
    best: Path = Path("data/model/model.pt")
    last: Path = Path("data/checkpoints/last.pt")


@dataclass(frozen=True)
class Trained:
    """A finished training, handed to `Hooks.finished` while its run is still open (main rank only)."""

    result: TrainResult
    run: TrainingRun
    device: torch.device
    dataset: Dataset
    corpus: dict[str, Any]  # corpus.json: its name, source and digest


@dataclass(frozen=True, kw_only=True)
class Hooks:
    """What a caller adds to a training."""

    name: str | None = None  # the MLflow run's name; None: the DVC experiment's
    tags: Mapping[str, str] = field(default_factory=dict)
    # each periodic evaluation, after it is logged; True stops the training there (a pruned trial)
    on_evaluation: Callable[[dict[str, float]], bool] | None = None
    finished: Callable[[Trained], None] | None = None
    # `train.processes > 1` restarts this script under torchrun with these arguments; None refuses
    launch: list[str] | None = None


def run_training(
    params: Params, files: TrainingFiles, *, hooks: Hooks | None = None, dataset: Dataset | None = None
) -> Trained | None:
    """Train per `params`, logging to one MLflow run; returns what `hooks.finished` got (None on the
    ranks that do not log, and in the process that only launched the workers)."""
    hooks = hooks or Hooks()
    world = World.from_env()
    dataset = dataset or load_dataset(files.prepared)  # a bad split fails here, before any worker
    allocation = allocation_from_env(params.train.launcher)
    if allocation is not None and world.is_main:
        hosts = ",".join(allocation.hosts)
        print(f"train: SLURM job {allocation.job_id} on {hosts}, restart {allocation.restarts}")
    # through srun in a SLURM job; a search's trial (no `launch`) trains in its worker, on one node
    in_job = allocation if hooks.launch is not None else None
    if not world.launched and (params.train.processes > 1 or (in_job and len(in_job.hosts) > 1)):
        launch_workers(params, hooks.launch, in_job)
        return None
    checkpointer = Checkpointer(files.best, files.last)
    saved = resumed_state(checkpointer, params, dataset, allocation)
    start = initial_weights(files.init, params, dataset.vocab)
    lineage = source_lineage(files.init, len(dataset.vocab)) if start is not None else {}
    corpus = read_json(files.corpus_info)
    tags = dict(hooks.tags) | (allocation.tags(world.world_size) if allocation else {})
    opened = {"saved": saved, "lineage": lineage, "name": hooks.name, "extra_tags": tags}
    with (
        world.running(params.train.device) as device,
        training_run(params, corpus, len(dataset.vocab), device, world, **opened) as run,
    ):
        if run.run_id and saved is None:
            log_input(run.run_id, corpus, dataset)

        def on_evaluation(record: dict[str, float]) -> bool:
            run.log_evaluation(record)
            return bool(hooks.on_evaluation and hooks.on_evaluation(record))

        result = train(
            dataset.splits,
            dataset.vocab,
            params,
            checkpointer.best_path,
            checkpointer.last_path,
            on_eval=on_evaluation,
            world=world,
            labels=run.labels,
            initial_weights=start,
            saved=saved,
        )
        if not world.is_main:
            return None
        trained = Trained(result, run, device, dataset, corpus)
        if hooks.finished:
            hooks.finished(trained)
        return trained


def resumed_state(
    checkpointer: Checkpointer, params: Params, dataset: Dataset, allocation: Allocation | None
) -> dict[str, Any] | None:
    """The training state to continue: the last checkpoint with `train.resume`, and in a SLURM job
    that was requeued (preempted) whenever one that fits is there; else None, a fresh start."""
    if params.train.resume:
        return checkpointer.load_resumable(params, dataset.vocab)
    if allocation is None or allocation.restarts == 0:
        return None
    if not checkpointer.last_path.is_file():
        print(f"train: requeued job {allocation.job_id}: no {checkpointer.last_path} yet, starting over")
        return None
    try:
        saved = checkpointer.load_resumable(params, dataset.vocab)
    except ResumeError as exc:
        print(f"train: requeued SLURM job {allocation.job_id}, starting over: {exc}", flush=True)
        return None
    print(f"train: requeued SLURM job {allocation.job_id} (restart {allocation.restarts}): resuming")
    return saved


def launch_workers(params: Params, argv: list[str] | None, allocation: Allocation | None = None) -> None:
    """`train.processes` workers per node under torchrun, each running `argv` (a script and its
    arguments): on this machine, or on every node of a SLURM allocation; a worker that dies fails the
    runs of all of them, with its reason."""
    if argv is None:
        raise UserError(
            f"train.processes: {params.train.processes} workers cannot run inside this process "
            "(a tuning trial trains in its worker); set train.processes=1"
        )
    try:
        if allocation is not None:
            launch_in_allocation(allocation, params.train.processes, argv)
            return
        launch_local(params.train.processes, argv, params.train.device)
    except DistributedError as failed:  # a worker died: the others were stopped as if by a user
        liveness.fail_launched_runs(str(failed))
        raise


def log_input(run_id: str, corpus: dict[str, Any], dataset: Dataset) -> None:
    """The corpus as the run's MLflow dataset; a store that is away costs the run this, not more."""
    import mlflow

    from lstm_textgen.tracking.datasets import log_corpus

    try:
        log_corpus(mlflow.MlflowClient(), run_id, corpus, dataset, context="training")
    except Exception as exc:  # the run's points go through the outbox; this one call does not
        print(f"mlflow: the corpus was not logged as the run's dataset ({str(exc)[:200]})", file=sys.stderr)

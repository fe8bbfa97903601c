"""The study and its workers: a worker process runs trials until the study has `tune.trials` of
them; the study's MLflow parent run holds each trial's run; the best trial's params become a DVC
experiment. Shared by every worker that names the same study and storage, on this machine
(`--workers K`) or others:

- each trial is a training run with the trial's params and budget, an MLflow run nested under the
  study's parent run (tags `tune.study`, `tune.trial`, `tune.state`);
- its periodic validation loss goes to the pruner, which stops a lagging trial at that evaluation
  (state PRUNED, no traceback), freeing the worker;
- a worker killed outright leaves its trial to the heartbeat (marked FAIL after twice
  `tune.heartbeat_seconds`); SIGTERM or Ctrl-C ends the trial as failed and the worker cleanly;
- the parent run ends FINISHED when a trial completed, FAILED when none did, and reopens when a later
  `tune` continues the study;
- a study in which no trial completed exits non-zero with the first failure's reason.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from lstm_textgen.apps.tune.report import experiment_settings, leaderboard
from lstm_textgen.apps.tune.trial import TrialObjective, TuneFiles, check_ready
from lstm_textgen.errors import Terminated, UserError
from lstm_textgen.network import without_password
from lstm_textgen.params import Params

if TYPE_CHECKING:
    import optuna

# every trial a worker took (a WAITING one is only enqueued)
STARTED = ("RUNNING", "COMPLETE", "PRUNED", "FAIL")


STORAGE_VARIABLE = "LSTM_TEXTGEN_TUNE_STORAGE"


def storage_url(params: Params) -> str:
    """The study's storage: LSTM_TEXTGEN_TUNE_STORAGE (a URL with its password, kept out of
    params.yaml as MLflow keeps its credentials out), else `tune.storage`, else optuna.db beside the
    local MLflow store. Shown only through `without_password`."""
    from lstm_textgen.tracking import store

    if os.environ.get(STORAGE_VARIABLE):
        return os.environ[STORAGE_VARIABLE]
    if params.tune.storage:
        return params.tune.storage
    if store.is_server(store.tracking_uri()):
        print(
            "tune: the study is kept in optuna.db on this machine; to share it with other machines, "
            "set tune.storage to a database they all reach (docs/team.md)",
            file=sys.stderr,
        )
    return f"sqlite:///{store.repository_root() / 'optuna.db'}"


def worker(
    params: Params, files: TuneFiles, *, storage: str, parent_run_id: str, deadline: float | None
) -> None:
    """Trials until the study has `tune.trials` of them or the deadline passes."""
    import optuna

    from lstm_textgen.train.search import open_study

    study = open_study(params, storage)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial: one line (print_trial)
    started = tuple(optuna.trial.TrialState[name] for name in STARTED)
    if params.tune.trials and len(study.get_trials(deepcopy=False, states=started)) >= params.tune.trials:
        print(f"tune: study {params.tune.study!r} has its {params.tune.trials} trials (--trials for more)")
        return
    stop = [optuna.study.MaxTrialsCallback(params.tune.trials, states=started)] if params.tune.trials else []
    timeout = None if deadline is None else max(0.0, deadline - time.time())
    objective = TrialObjective(params, files, parent_run_id)
    try:
        study.optimize(
            objective,
            timeout=timeout,
            callbacks=[*stop, print_trial],
            catch=(Exception,),  # a failing trial (a bad combination) is FAIL; the worker goes on
            gc_after_trial=True,
        )
    except KeyboardInterrupt:
        if isinstance(objective.stopped_by, Terminated):  # exit 143, as SIGTERM is reported
            raise objective.stopped_by from None
        raise


def print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial, as the worker's log."""
    reason = trial.user_attrs.get("error") or trial.user_attrs.get("stopped") or ""
    value = f"{trial.value:.4f}" if trial.value is not None else ""
    print(f"tune: trial {trial.number} {trial.state.name.lower()} {value}{reason}".rstrip(), flush=True)


def parent_run(params: Params, study: optuna.Study) -> str:
    """The study's MLflow run, made by whoever opens the study first; each trial's run nests under it."""
    from lstm_textgen.tracking import store

    known = study.user_attrs.get("mlflow_parent_run_id")
    mlflow = store.configure()
    client = mlflow.MlflowClient()
    if known and store.existing_run(known):
        client.update_run(str(known), status="RUNNING")  # a later `tune` continues the study
        return str(known)
    experiment = client.get_experiment_by_name(store.experiment_name()).experiment_id
    tags = {"tune.study": params.tune.study, "tune.role": "study", "mlflow.note.content": study_note(params)}
    run_id = client.create_run(experiment, run_name=f"study {params.tune.study}", tags=tags).info.run_id
    study.set_user_attr("mlflow_parent_run_id", run_id)
    return run_id


def study_note(params: Params) -> str:
    space = ", ".join(params.tune.space)
    return (
        f"Optuna study `{params.tune.study}`: {params.tune.sampler} sampler, {params.tune.pruner} pruner, "
        f"searching {space}. Its trials are the runs nested below; `lstm-textgen tune show` ranks them."
    )


def start_workers(count: int, argv: list[str]) -> list[subprocess.Popen[bytes]]:
    """`count` worker processes: here, or, in a SLURM job of that many tasks (`lstm-textgen slurm
    submit-tune`), one per task wherever SLURM placed them, all through one srun."""
    from lstm_textgen.train.slurm import srun_tasks, tasks_in_job

    command = [sys.executable, "-m", "lstm_textgen.apps.tune", "worker", *argv]
    if count > 1 and tasks_in_job() >= count:
        print(f"tune: {count} workers as the tasks of SLURM job {os.environ['SLURM_JOB_ID']}", flush=True)
        return [subprocess.Popen(srun_tasks(count, command))]
    return [subprocess.Popen(command) for _ in range(count)]


def wait_for(workers: list[subprocess.Popen[bytes]]) -> list[int]:
    """Until every worker ends (their exit codes); a stop request to this process goes on to the
    workers."""
    try:
        return [process.wait() for process in workers]
    except BaseException:
        for process in workers:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in workers:
            process.wait()
        raise


def best_as_experiment(params: Params, study: optuna.Study) -> None:
    """The best trial's params as a DVC experiment (`dvc exp show` lists it), which trains, evaluates
    and registers a version that competes for `champion` like any other."""
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        print("tune: no trial completed; no experiment to run")
        return
    best = study.best_trial
    name = f"tune-{params.tune.study}-{best.number}"
    listed = subprocess.run(
        ["dvc", "exp", "list", "--name-only"], capture_output=True, text=True, check=False
    )
    if name in listed.stdout.split():
        print(f"tune: the best trial ({best.number}) is already the DVC experiment {name}")
        return
    command = ["dvc", "exp", "run", "--temp", "-n", name, *experiment_settings(params, best.params)]
    print(f"tune: the best trial, {best.number}, as a DVC experiment: {' '.join(command)}", flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise UserError(f"the DVC experiment of the best trial failed; run it again: {' '.join(command)}")


def run_study(params: Params, files: TuneFiles, argv: list[str]) -> None:
    """Start the workers, wait for them, print the leaderboard and end the parent run; the best
    trial becomes a DVC experiment. Fails, naming why, when none of this call's trials completed."""
    import optuna

    from lstm_textgen.train.search import open_study

    check_ready(params, files)  # before any worker starts: each would fail the same way
    storage = storage_url(params)
    study = open_study(params, storage)  # the schema and the study exist before any worker starts
    parent = parent_run(params, study)
    known = {trial.number for trial in study.get_trials(deepcopy=False)}
    deadline = time.time() + 60 * params.tune.minutes if params.tune.minutes else None
    extra = ["--parent-run", parent, *(["--deadline", str(deadline)] if deadline else [])]
    print(
        f"tune: study {params.tune.study!r} in {without_password(storage)}: {params.tune.workers} "
        f"worker(s), up to {params.tune.trials or 'unlimited'} trials; MLflow run {parent}",
        flush=True,
    )
    try:
        codes = wait_for(start_workers(params.tune.workers, [*argv, *extra]))
    except BaseException:
        end_parent_run(parent, "KILLED")
        raise
    study = optuna.load_study(study_name=params.tune.study, storage=storage)
    print(leaderboard(study, params))
    new = [trial for trial in study.get_trials(deepcopy=False) if trial.number not in known]
    failure = why_nothing_completed(new, codes)
    end_parent_run(parent, "FAILED" if failure else "FINISHED")
    if failure:
        raise UserError(f"tune: study {params.tune.study!r}: {failure}")
    if params.tune.experiment:
        best_as_experiment(params, study)


def why_nothing_completed(trials: list[optuna.trial.FrozenTrial], codes: list[int]) -> str | None:
    """None when a trial of this call completed (or none was due: the study had its trials);
    otherwise the first failure's reason, in one line."""
    from optuna.trial import TrialState

    if any(trial.state == TrialState.COMPLETE for trial in trials):
        return None
    failed = [trial for trial in trials if trial.state == TrialState.FAIL]
    if failed:
        first = min(failed, key=lambda trial: trial.number)
        reason = first.user_attrs.get("error") or first.user_attrs.get("stopped") or "no reason recorded"
        return f"no trial completed: {len(failed)} failed; the first, trial {first.number}: {reason}"
    if trials:
        return f"no trial completed: all {len(trials)} were pruned or left unfinished"
    broken = [code for code in codes if code != 0]
    return f"no trial ran: the workers exited with {broken} (see above)" if broken else None


def end_parent_run(run_id: str, status: str) -> None:
    """The study's run ends with this call of `tune` (a later call reopens it)."""
    from lstm_textgen.tracking import store

    with contextlib.suppress(Exception):  # the study's outcome matters more than its run's state
        store.configure().MlflowClient().set_terminated(run_id, status)

"""MLflow tracking: the only place that knows where the store is, and how to reach it.

The store is a SQLite database `mlflow.db` at the repository root with artifacts under `mlruns/`.
Its location comes from MLFLOW_TRACKING_URI if set, else DVC's DVC_ROOT (a queued `dvc exp run`
works in a temporary copy that is deleted afterwards, while DVC_ROOT names the real repository), else
the nearest directory above the working directory that holds `.dvc` or `.git`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lstm_textgen.errors import UserError

EXPERIMENT_NAME = "lstm-textgen"

# MLflow 3's UI opens an experiment of this kind on its runs, not on the GenAI overview
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# For the MLflow servers this project starts (the lab's, `lstm-textgen ui`): MLflow's job runner
# (GenAI evaluations: a runner and several worker processes) serves nothing of this project.
SERVER_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def repository_root() -> Path:
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repository_root() / 'mlflow.db'}"


def artifact_root() -> str | None:
    """Where a new experiment keeps its artifacts: beside the local store (mlruns/), or, with a
    tracking server, wherever the server says (its proxied artifact store): a local path there would
    keep every model on the training machine's disk, out of other machines' reach."""
    if is_server(tracking_uri()):
        return None
    return (repository_root() / "mlruns").as_uri()


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def pending_dir(uri: str | None = None) -> Path:
    """Where a run keeps what the store did not take (outbox.py): beside the local store, one folder
    per tracking store (named by a hash of its URI, which `store.txt` in it names, without any
    password), so that points kept for one server are never sent to another."""
    import hashlib

    from lstm_textgen.network import without_password

    uri = uri or tracking_uri()
    folder = repository_root() / "mlflow-pending" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    label = folder / "store.txt"
    if not label.exists():
        folder.mkdir(parents=True, exist_ok=True)
        label.write_text(without_password(uri) + "\n")
    return folder


CREDENTIALS = "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"


# How long a command waits for a tracking server that is away (restarting, its database down) before
# it gives up in one line. An environment setting, not a params.yaml key: how long to wait for the
# lab's server is the machine's business, and a params key would make DVC re-run stages over it.
WAIT_VARIABLE = "LSTM_TEXTGEN_TRACKING_WAIT_MINUTES"
DEFAULT_WAIT_MINUTES = 5.0


def wait_minutes() -> float:
    value = os.environ.get(WAIT_VARIABLE, str(DEFAULT_WAIT_MINUTES))
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not 0 <= minutes < math.inf:
        raise UserError(f"{WAIT_VARIABLE} must be a number of minutes >= 0, got {value!r}")
    return minutes


def check_server(uri: str) -> None:
    """Wait, up to `wait_minutes()`, for the tracking server and its database to answer, saying once
    what it waits for; then fail in one line naming the server and what to do. A refused account
    fails at once: not with a traceback after MLflow's four minutes of retries, or after ten minutes
    of training."""
    minutes = wait_minutes()
    deadline, pause, said = time.monotonic() + 60 * minutes, 1.0, False
    while True:
        problem = server_problem(uri)
        if problem is None:
            if said:
                print(f"mlflow: the tracking server {uri} answers again", file=sys.stderr)
            return
        if time.monotonic() + pause > deadline:
            raise UserError(
                f"the tracking server {uri} (MLFLOW_TRACKING_URI) {problem} and did not answer for "
                f"{minutes:g} minute(s) ({WAIT_VARIABLE}): start it (`lstm-textgen server start --dir "
                "DIR` on its machine), or unset MLFLOW_TRACKING_URI for the local store; then run the "
                "command again (`dvc repro` re-runs only the stages that did not finish)"
            )
        if not said:
            print(
                f"mlflow: the tracking server {uri} {problem}; waiting up to {minutes:g} minute(s) for it "
                f"({WAIT_VARIABLE})",
                file=sys.stderr,
            )
            said = True
        time.sleep(pause)
        pause = min(pause * 2, 10.0)


def server_problem(uri: str) -> str | None:
    """Why the server cannot take our calls now (None: it can). An account it refuses is a
    UserError at once: waiting would not change it."""
    import requests

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    try:
        answer = requests.get(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": experiment_name()},
            auth=(user, password or "") if user else None,
            timeout=30,
            verify=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True,
        )
    except requests.RequestException as exc:
        return f"does not answer ({type(exc).__name__})"
    if answer.status_code == 401:
        problem = "needs an account: set" if not user else f"refused the user {user!r}: check"
        raise UserError(f"the tracking server {uri} {problem} {CREDENTIALS}")
    if answer.status_code >= 500:  # restarting, or its database is away
        return f"answers HTTP {answer.status_code}"
    return None


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` held by this process (every process on this machine waits)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def configure() -> Any:
    """Point MLflow at the store and make sure the experiment exists. On a local SQLite store the
    first use creates the schema: processes starting together on a new store (`dvc queue start -j 2`)
    would race on MLflow's schema migration and lose runs, so the first touch is serialised."""
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if is_server(uri):
        check_server(uri)
    database = Path(uri.removeprefix("sqlite:///"))
    local = uri.startswith("sqlite:///")
    with file_lock(database.with_name(database.name + ".lock")) if local else contextlib.nullcontext():
        _ensure_experiment(mlflow)
    mlflow.set_experiment(experiment_name())
    return mlflow


def _ensure_experiment(mlflow: Any) -> None:
    name = experiment_name()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            mlflow.create_experiment(name, artifact_location=artifact_root(), tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:  # another machine created it a moment ago
            if mlflow.get_experiment_by_name(name) is None:
                raise
    elif not EXPERIMENT_KIND.items() <= experiment.tags.items():
        for key, value in EXPERIMENT_KIND.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)


@contextmanager
def registry_lock() -> Iterator[None]:
    """One process at a time decides the champion: experiments run side by side (`dvc queue start
    -j 2`) would otherwise both read the old champion and both set the alias. A file lock beside the
    store's artifacts, so it spans every process on this machine. With a tracking server there is
    no lock to share between machines: `registry.settle_champion` makes the alias converge."""
    if is_server(tracking_uri()):
        yield
        return
    with file_lock(repository_root() / "mlruns" / ".registry.lock"):
        yield


def existing_run(run_id: str | None) -> str | None:
    """`run_id` if the store holds that run (a checkpoint may come from another store)."""
    if not run_id:
        return None
    mlflow = configure()
    try:
        return mlflow.MlflowClient().get_run(run_id).info.run_id
    except mlflow.exceptions.MlflowException:
        return None


# While a run's outbox and heartbeat send in the background they retry on their own, every few
# seconds: MLflow's retries (seven, doubling from 2 s: about four minutes) would keep the points
# waiting minutes after a server came back, and a hung server would hold each call 120 s.
OWN_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@contextmanager
def retrying_on_our_own() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in OWN_RETRIES}
    os.environ.update(OWN_RETRIES)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

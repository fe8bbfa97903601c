"""MLflow tracking: the only place that knows where the store is.

The store is a SQLite database `mlflow.db` at the repository root with artifacts under `mlruns/`.
Its location comes from MLFLOW_TRACKING_URI if set, else DVC's DVC_ROOT (a queued `dvc exp run`
works in a temporary copy that is deleted afterwards, while DVC_ROOT names the real repository), else
the nearest directory above the working directory that holds `.dvc` or `.git`.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lstm_textgen.errors import Terminated, UserError, shutting_down

EXPERIMENT_NAME = "lstm-textgen"
# A run renews its `owner.heartbeat` tag every HEARTBEAT_S; on another host it counts as dead after
# HEARTBEAT_TIMEOUT_S without one (room for a server outage and for clocks a few minutes apart).
HEARTBEAT_S = 60.0
HEARTBEAT_TIMEOUT_S = 15 * 60.0
# MLflow 3's UI opens an experiment of this kind on its runs, not on the GenAI overview
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
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


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=repository_root(), capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def source_tags() -> dict[str, str]:
    """MLflow's own tags for where a run comes from, which its UI shows in the Source column: the
    script (relative to the repository), the commit and, where the clone has one, its remote."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    root = repository_root()
    name = str(script.relative_to(root)) if script and script.is_relative_to(root) else str(script or "")
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": name or "lstm-textgen",
        "mlflow.source.git.commit": _git("rev-parse", "HEAD"),
        "mlflow.source.git.repoURL": _git("remote", "get-url", "origin"),
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def run_tags(corpus: dict[str, Any], device: str) -> dict[str, str]:
    tags = {
        **source_tags(),
        "git_commit": _git("rev-parse", "HEAD"),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME"),
        "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"),
        "corpus": corpus.get("name"),
        "corpus_source": corpus.get("source"),
        "corpus_sha256": corpus.get("source_sha256"),
        "corpus_text_sha256": corpus.get("text_sha256"),
        "device": device,
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def run_name() -> str | None:
    """Named after the DVC experiment when there is one; MLflow picks a name otherwise."""
    return os.environ.get("DVC_EXP_NAME") or None


def run_description() -> str:
    """What reproduces this run, shown as the run's description in the MLflow UI."""
    commit = _git("rev-parse", "--short", "HEAD") or "the current commit"
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        return (
            f"DVC experiment `{experiment}` (baseline {commit}). "
            f"Reproduce: `dvc exp apply {experiment} && dvc repro`."
        )
    return f"Pipeline run at {commit}. Reproduce: `git checkout {commit} && dvc repro`."


@contextmanager
def active_run(run_id: str | None = None, **start_kwargs: Any) -> Iterator[Any]:
    """Start (or reopen, by id) a run. An exception marks it FAILED, a stop request (Ctrl-C,
    SIGTERM) KILLED, with the reason as the `error` tag, and says where to look. The run records
    the host and process that own it, so a later run can tell when that process died without
    closing it (`close_abandoned_runs`)."""
    mlflow = configure()
    with mlflow.start_run(run_id=run_id, **start_kwargs) as run, heartbeat(run.info.run_id):
        mlflow.set_tags(owner_tags())
        try:
            yield run
        except BaseException as exc:
            shutting_down()
            status = "KILLED" if isinstance(exc, (KeyboardInterrupt, Terminated)) else "FAILED"
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.end_run(status=status)
            print(failure_note(run.info.run_id, status), file=sys.stderr)
            raise


def failure_note(run_id: str, status: str) -> str:
    return (
        f"MLflow run {run_id} is marked {status} with the reason as its 'error' tag; look at it with "
        f"`make ui` (experiment {experiment_name()}, status {status.title()})"
    )


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


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for
    the process that owned a run; None where it cannot be read (no such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def launcher_tag(pid: int | None = None) -> str:
    """Names a launcher process on this host (a reused pid is told apart by its start time)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}"


def owner_tags() -> dict[str, str]:
    pid = os.getpid()
    launched = {"owner.launcher": launcher_tag(os.getppid())} if "TORCHELASTIC_RUN_ID" in os.environ else {}
    return {
        **launched,
        "owner.host": socket.gethostname(),
        "owner.pid": str(pid),
        "owner.start": str(process_start(pid)),
        "owner.heartbeat": f"{time.time():.0f}",
    }


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


@contextmanager
def heartbeat(run_id: str, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """While the block runs, the run's `owner.heartbeat` tag is renewed every `every_s` seconds, so
    that another machine can tell a live run from one whose process died (`owner_alive`). A failed
    renewal (the server away for a moment) is skipped: the next one will do."""
    import threading

    import mlflow

    done = threading.Event()

    def beat() -> None:
        client = mlflow.MlflowClient()
        while not done.wait(every_s):
            with contextlib.suppress(Exception):
                client.set_tag(run_id, "owner.heartbeat", f"{time.time():.0f}")

    thread = threading.Thread(target=beat, name="mlflow-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def owner_alive(tags: dict[str, str], now: float | None = None) -> bool:
    """Whether the process that owns a run still runs: on this host, by its pid and start time; on
    another, by a heartbeat renewed within HEARTBEAT_TIMEOUT_S. A run without a heartbeat (logged by
    an older version) is never taken for dead on another host. Tags are anyone's with EDIT on the
    run: one that does not parse proves nothing, and a run is never closed on it."""
    pid = tag_number(tags, "owner.pid")
    if tags.get("owner.host") == socket.gethostname() and pid is not None and pid.is_integer() and pid > 0:
        return process_start(int(pid)) == tags.get("owner.start")
    beat = tag_number(tags, "owner.heartbeat")
    return beat is None or (now or time.time()) - beat < HEARTBEAT_TIMEOUT_S


def tag_number(tags: dict[str, str], name: str) -> float | None:
    """A tag as a finite number, or None when it is absent or is not one."""
    try:
        value = float(tags[name])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def may_edit(client: Any, run_id: str) -> bool:
    """Whether this account may write to the run (a tracking server's READ account may not)."""
    import mlflow

    try:
        client.set_tag(run_id, "owner.checked", f"{time.time():.0f}")
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "PERMISSION_DENIED":
            return False
        raise
    return True


def close_abandoned_runs() -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose owning process on this host is gone
    (SIGKILL, a crash, a power cut): no run stays RUNNING forever. Returns their ids."""
    mlflow = configure()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name())
    closed = []
    for run in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'"):
        if owner_alive(run.data.tags):
            continue
        owner = f"{run.data.tags.get('owner.host')}:{run.data.tags.get('owner.pid')}"
        if not may_edit(client, run.info.run_id):
            continue  # a read-only account leaves it to the next one that may write
        client.set_tag(
            run.info.run_id,
            "error",
            f"its process {owner} ended without closing the run (killed or crashed, or its machine "
            f"stopped beating for {HEARTBEAT_TIMEOUT_S // 60:.0f} minutes); marked KILLED by a later run",
        )
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def fail_launched_runs(reason: str) -> list[str]:
    """Mark FAILED, with `reason`, the runs that workers of this launcher left KILLED or RUNNING: when
    one worker dies, torchrun stops the others with SIGTERM, which they cannot tell from a user's
    stop request. The job failed; its run says so. Returns their ids."""
    mlflow = configure()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name())
    query = f"tags.`owner.launcher` = '{launcher_tag()}'"
    marked = []
    for run in client.search_runs([experiment.experiment_id], query):
        if run.info.status in ("KILLED", "RUNNING"):
            client.set_tag(run.info.run_id, "error", reason[:5000])
            client.set_terminated(run.info.run_id, status="FAILED")
            marked.append(run.info.run_id)
    return marked

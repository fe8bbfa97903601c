"""Who owns a run and whether they are alive: the owner tags (host, process, its start time), the
heartbeat a run renews while open, runs left RUNNING by a process that is gone (closed as KILLED),
runs opened as `active_run` (FAILED or KILLED with the reason when the block raises), and the runs of
workers a launcher started."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lstm_textgen.errors import Terminated, shutting_down
from lstm_textgen.tracking.store import configure, experiment_name

# A run renews its `owner.heartbeat` tag every HEARTBEAT_S; on another host it counts as dead after
# HEARTBEAT_TIMEOUT_S without one (room for a server outage and for clocks a few minutes apart).
HEARTBEAT_S = 60.0
HEARTBEAT_TIMEOUT_S = 15 * 60.0


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

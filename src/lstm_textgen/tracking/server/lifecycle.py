"""`server start`, `stop` and `status`: the cluster and the MLflow server together, a restart keeping
the first start's ports and stores."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from lstm_textgen.errors import UserError
from lstm_textgen.network import free_port
from lstm_textgen.tracking import liveness
from lstm_textgen.tracking.server.layout import (
    ADMIN,
    Layout,
    ServerState,
    read_secrets,
    read_state,
    write_state,
)
from lstm_textgen.tracking.server.postgres import postgres_running, start_postgres, stop_postgres
from lstm_textgen.tracking.server.process import (
    check_transport,
    directory_lock,
    healthy,
    port_taken,
    server_running,
    start_mlflow,
)


@dataclass(frozen=True)
class Transport:
    """How the tracking server is reached: its address, and TLS."""

    host: str = "127.0.0.1"
    port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_http: bool = False


def start(
    root: Path,
    transport: Transport | None = None,
    artifacts: str | None = None,
    database_url: str | None = None,
) -> ServerState:
    """Start whatever is not running; a restart keeps the ports and stores of the first start."""
    layout = Layout.of(root.resolve())
    with directory_lock(layout):
        return _start(layout, transport or Transport(), artifacts, database_url)


def _start(
    layout: Layout, transport: Transport, artifacts: str | None, database_url: str | None
) -> ServerState:
    if bool(transport.tls_cert) != bool(transport.tls_key):
        raise UserError("TLS needs both --tls-cert and --tls-key")
    for path in (transport.tls_cert, transport.tls_key):
        if path is not None and not path.is_file():
            raise UserError(f"{path}: no such file (--tls-cert / --tls-key)")
    state = read_state(layout) or ServerState(
        host=transport.host,
        port=transport.port or 5000,
        pg_port=None if database_url else free_port(),
        database_url=database_url,
        artifacts=artifacts or str(layout.artifacts),
    )
    state.host, state.port = transport.host, transport.port or state.port
    if transport.tls_cert and transport.tls_key:
        state.tls_cert, state.tls_key = str(transport.tls_cert.resolve()), str(transport.tls_key.resolve())
    check_transport(state.host, bool(state.tls_cert), transport.insecure_http)
    running = server_running(state) and healthy(state.uri, state.verify)
    if not running and port_taken(state.host, state.port):
        raise UserError(
            f"port {state.port} on {state.host} already answers, and not with this directory's server "
            "(another server, another user's, or one whose process this directory lost): stop it, or "
            "choose another --port"
        )
    if state.database_url is None:
        url = start_postgres(layout, state.pg_port or free_port(), read_secrets(layout)["database_password"])
    else:
        url = state.database_url
    if running:
        print(f"server: already running at {state.uri} (pid {state.pid})")
        return state
    if "://" not in state.artifacts:
        Path(state.artifacts).mkdir(parents=True, exist_ok=True)
    state.pid = start_mlflow(layout, state, url, read_secrets(layout)["flask_secret_key"])
    state.pid_start, state.initialised = liveness.process_start(state.pid), True
    write_state(layout, state)
    return state


def stop(root: Path) -> None:
    """Stop the tracking server, then PostgreSQL; every run stays in the directory."""
    layout = Layout.of(root.resolve())
    state = read_state(layout)
    if state is None:
        raise UserError(f"no tracking server was ever started in {layout.root} (`lstm-textgen server start`)")
    if server_running(state):
        os.killpg(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while server_running(state) and time.monotonic() < deadline:
            time.sleep(0.2)
        if server_running(state):
            os.killpg(state.pid, signal.SIGKILL)
    state.pid = state.pid_start = None
    write_state(layout, state)
    if state.database_url is None:
        stop_postgres(layout)


def client_variables(state: ServerState) -> str:
    return (
        "On each machine that trains, serves or looks at runs:\n"
        f"  export MLFLOW_TRACKING_URI={state.uri}\n"
        f"  export MLFLOW_TRACKING_USERNAME={ADMIN}      # or the user's own account (server add-user)\n"
        "  read -s MLFLOW_TRACKING_PASSWORD && export MLFLOW_TRACKING_PASSWORD"
    )


def status(root: Path) -> bool:
    """Print what runs; with credentials in the environment, also close the runs whose process died
    on any machine (`liveness.close_abandoned_runs`). True when the server answers."""
    layout = Layout.of(root.resolve())
    state = read_state(layout)
    if state is None:
        print(f"server: nothing in {layout.root} (`lstm-textgen server start --dir {root}`)")
        return False
    postgres = "running" if postgres_running(layout) else "stopped"
    database = "an external database" if state.database_url else f"PostgreSQL :{state.pg_port} {postgres}"
    up = server_running(state) and healthy(state.uri, state.verify)
    running = "running" if up else "stopped"
    print(f"server: MLflow at {state.uri} {running} ({database}; artifacts {state.artifacts})")
    if up and os.environ.get("MLFLOW_TRACKING_USERNAME"):
        os.environ.setdefault("MLFLOW_TRACKING_URI", state.uri)
        for run_id in liveness.close_abandoned_runs():
            print(f"server: run {run_id} was left RUNNING by a process that is gone; marked KILLED")
    return up

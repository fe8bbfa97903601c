"""The MLflow tracking server process: its transport (loopback, or TLS), its auth config, its lock on
the directory, and starting it as the account `service_account` names."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from lstm_textgen.errors import UserError
from lstm_textgen.files import write_text
from lstm_textgen.network import wait_until
from lstm_textgen.tracking import liveness
from lstm_textgen.tracking.server.layout import (
    ADMIN,
    AUTH_DATABASE,
    DEFAULT_PERMISSION,
    LOOPBACK,
    MIN_PASSWORD,
    PASSWORD_VARIABLE,
    START_TIMEOUT_S,
    Layout,
    ServerState,
)
from lstm_textgen.tracking.server.service_account import (
    can_run_python,
    grant_reach,
    hand_over,
    service_account,
)
from lstm_textgen.tracking.store import SERVER_DEFAULTS


def server_running(state: ServerState) -> bool:
    return state.pid is not None and liveness.process_start(state.pid) == state.pid_start


def healthy(uri: str, verify: str | bool = True) -> bool:
    import requests

    try:
        return requests.get(f"{uri}/health", timeout=5, verify=verify).status_code == 200
    except requests.RequestException:
        return False


def port_taken(host: str, port: int) -> bool:
    """Whether something already accepts connections on the port (another server, another user's)."""
    import socket

    target = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    with socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET) as probe:
        probe.settimeout(2)
        return probe.connect_ex((target, port)) == 0


@contextlib.contextmanager
def directory_lock(layout: Layout) -> Iterator[None]:
    """One `server start` (or restore) at a time per directory: a second one is refused at once."""
    import fcntl

    layout.root.mkdir(parents=True, exist_ok=True)
    with (layout.root / ".server.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another `lstm-textgen server` command is starting or restoring {layout.root}; wait for it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_transport(host: str, tls: bool, insecure_http: bool) -> None:
    """Basic-auth passwords cross the network in every request: beyond this machine, only over TLS
    unless the user says the network is trusted."""
    if host in LOOPBACK or tls or insecure_http:
        return
    raise UserError(
        f"--host {host} would send every account's password over plain HTTP: give --tls-cert CERT.pem "
        "--tls-key KEY.pem (clients then set MLFLOW_TRACKING_SERVER_CERT_PATH for a self-signed one), "
        "or --insecure-http on a network you trust (or behind a TLS proxy)"
    )


def auth_config(database_url: str) -> str:
    auth_url = database_url.rsplit("/", 1)[0] + f"/{AUTH_DATABASE}"
    return (
        "[mlflow]\n"
        f"default_permission = {DEFAULT_PERMISSION}\n"
        f"database_uri = {auth_url}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # a password is checked (PBKDF2) once a minute, not on every logging call of every run;
        # a changed password or a deleted account takes up to that long to count
        "auth_cache_ttl_seconds = 60\n"
    )


def admin_password(state: ServerState) -> str | None:
    """Needed on the first start only: the auth database keeps the account afterwards."""
    password = os.environ.get(PASSWORD_VARIABLE)
    if state.initialised:
        return password
    if not password or len(password) < MIN_PASSWORD:
        raise UserError(
            f"the first start creates the account `{ADMIN}`: set its password (at least {MIN_PASSWORD} "
            f"characters) in {PASSWORD_VARIABLE}, e.g. `read -s {PASSWORD_VARIABLE} && export "
            f"{PASSWORD_VARIABLE}`; there is no default password"
        )
    return password


def start_mlflow(layout: Layout, state: ServerState, database_url: str, secret_key: str) -> int:
    """The tracking server in its own session (stop signals its whole group), as `service_account`;
    returns its pid once /health answers."""
    write_text(layout.auth_config, auth_config(database_url), secret=True)  # the database password
    account = service_account(layout)
    why = can_run_python(account) if account else None  # probed once, again only once granted
    if account and why and (granted := grant_reach(account)):
        print(
            f"server: the account uid {account.uid} may now pass through (x, not read) "
            f"{', '.join(map(str, granted))} to run {sys.executable}; undo with "
            f"`setfacl -x u:{account.uid} FOLDER`"
        )
        why = can_run_python(account)
    if account and why:
        print(
            f"server: WARNING: the MLflow server runs as root: the account uid {account.uid} it would run "
            f"as cannot run {sys.executable} ({why}); install `acl` (setfacl) or the venv's Python where "
            "other accounts can read it, or start the server as the user that owns the directory",
            file=sys.stderr,
        )
        account = None
    handed = hand_over(layout, state, account) if account else {}
    cert, key = handed.get("tls_cert", state.tls_cert), handed.get("tls_key", state.tls_key)
    env = {
        **SERVER_DEFAULTS,
        **os.environ,
        **({"HOME": handed["HOME"]} if "HOME" in handed else {}),
        "MLFLOW_AUTH_CONFIG_PATH": str(layout.auth_config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key,
        # the server's own uvicorn must be found where its mlflow is (a venv not on PATH)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    password = admin_password(state)
    if password:
        env[PASSWORD_VARIABLE] = password
    env["MLFLOW_BACKEND_STORE_URI"] = database_url  # not on the command line, where `ps` shows it
    command = [str(Path(sys.executable).parent / "mlflow"), "server"]
    command += ["--serve-artifacts", "--artifacts-destination", state.artifacts]
    command += ["--host", state.host, "--port", str(state.port), "--workers", "1", "--app-name", "basic-auth"]
    if cert and key:
        command += ["--uvicorn-opts", f"--ssl-certfile {cert} --ssl-keyfile {key}"]
    who = {"user": account.uid, "group": account.gid, "extra_groups": []} if account else {}
    with layout.log.open("a") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=layout.root,
            **who,
        )
    try:
        wait_until(lambda: healthy(state.uri, state.verify), f"{state.uri}/health", START_TIMEOUT_S, process)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        tail = layout.log.read_text(errors="replace")[-3000:]
        raise UserError(f"the MLflow server did not start; the end of {layout.log}:\n{tail}") from None
    return process.pid

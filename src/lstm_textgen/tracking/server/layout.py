"""The server directory: where each file lives (`Layout`), what `server.json` records (`ServerState`)
and the secrets made once (`secrets.json`, 0600)."""

from __future__ import annotations

import json
import secrets
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from lstm_textgen.errors import UserError
from lstm_textgen.files import write_text
from lstm_textgen.network import without_password

DATABASE, AUTH_DATABASE, ROLE = "mlflow", "mlflow_auth", "mlflow"
ADMIN = "admin"
PASSWORD_VARIABLE = "MLFLOW_AUTH_ADMIN_PASSWORD"
MIN_PASSWORD = 12  # what MLflow's basic-auth requires of the admin password
START_TIMEOUT_S = 180.0  # the first start creates the schema: a slow machine takes its time
# What an account may do where nothing was granted: read. MLflow takes the default as a floor under
# every grant, so trainers get EDIT explicitly (`add-user`); the admin can do everything.
DEFAULT_PERMISSION = "READ"


@dataclass(frozen=True)
class Layout:
    """Where each part lives inside the server's directory."""

    root: Path
    cluster: Path  # the private PostgreSQL cluster
    socket: Path  # its Unix socket's folder
    artifacts: Path
    state: Path  # server.json: ServerState
    secrets: Path  # the database role's password and the session key (0600)
    auth_config: Path  # basic_auth.ini (0600)
    log: Path

    @classmethod
    def of(cls, root: Path) -> Layout:
        names = (
            "postgres",
            "socket",
            "artifacts",
            "server.json",
            "secrets.json",
            "basic_auth.ini",
            "mlflow.log",
        )
        return cls(root, *(root / name for name in names))


@dataclass
class ServerState:
    """What a restart reuses (ports, stores) and what stop and status need (the process)."""

    host: str
    port: int
    pg_port: int | None  # None with a database the user gave
    database_url: str | None  # the user's PostgreSQL, or None for the private cluster
    artifacts: str
    initialised: bool = False  # the admin account exists
    pid: int | None = None
    pid_start: str | None = None
    tls_cert: str | None = None  # HTTPS with this certificate and key (uvicorn's own TLS)
    tls_key: str | None = None

    @property
    def uri(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"{'https' if self.tls_cert else 'http'}://{host}:{self.port}"

    @property
    def verify(self) -> str | bool:
        """What our own checks trust: the server's certificate itself (it may be self-signed)."""
        return self.tls_cert or True


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run_checked(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise UserError(f"{what} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def read_state(layout: Layout) -> ServerState | None:
    if not layout.state.exists():
        return None
    state = ServerState(**json.loads(layout.state.read_text()))
    if state.database_url:  # the full URL, password included, is in secrets.json
        state.database_url = read_secrets(layout).get("database_url", state.database_url)
    return state


def write_state(layout: Layout, state: ServerState) -> None:
    """server.json, readable by all (ports, process): a user's --database-url keeps its password
    in secrets.json (0600) instead."""
    shown = asdict(state)
    if state.database_url:
        shown["database_url"] = without_password(state.database_url)
        secret = read_secrets(layout) | {"database_url": state.database_url}
        write_text(layout.secrets, json.dumps(secret), secret=True)
    write_text(layout.state, json.dumps(shown, indent=2) + "\n")


def read_secrets(layout: Layout) -> dict[str, str]:
    """The database role's password and the web session key, made once, readable by the owner only."""
    if layout.secrets.exists():
        return json.loads(layout.secrets.read_text())
    made = {"database_password": secrets.token_urlsafe(24), "flask_secret_key": secrets.token_hex(32)}
    write_text(layout.secrets, json.dumps(made), secret=True)
    return made

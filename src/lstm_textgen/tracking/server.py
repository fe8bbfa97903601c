"""`lstm-textgen server`: a lab's tracking service kept in one directory. A private PostgreSQL cluster
(Debian's package) holds the runs, the registry and the accounts; an MLflow tracking server on it
serves the artifacts itself (`--serve-artifacts`, so a model registered on one machine loads on any
other) and asks for a user name and password (MLflow's basic-auth app).

The directory holds everything to back up: `postgres/` (the cluster), `artifacts/` (unless the user
names another artifact store), `server.json` (ports, process), `secrets.json` (the database role's
password and the web session key, mode 0600) and the logs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import site
import subprocess
import sys
import tarfile
import tempfile
import time
from argparse import RawDescriptionHelpFormatter as RawText
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from lstm_textgen.errors import UserError
from lstm_textgen.files import write_text
from lstm_textgen.network import free_port, without_password
from lstm_textgen.tracking import store

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


# --- PostgreSQL -----------------------------------------------------------------------------------


def postgres_bin(tool: str) -> Path:
    """A tool of Debian's PostgreSQL (the newest installed version): its binaries are off PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), key=lambda p: int(p.parts[4]))
    if not found:
        raise UserError(
            "PostgreSQL is not installed: `apt-get install postgresql` (Debian's package), or give "
            "`--database-url postgresql://USER:PASSWORD@HOST:PORT/DB` of an existing database"
        )
    return found[-1]


def _as_postgres(command: list[str | Path]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, its tools run as the `postgres` user."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return [*prefix, *map(str, command)]


def pg(tool: str, *args: str | Path) -> list[str]:
    """A PostgreSQL tool's command line (run as `postgres` when we are root)."""
    return _as_postgres([postgres_bin(tool), *args])


def on_socket(layout: Layout, port: int | None) -> list[str]:
    """Connection options: the cluster's superuser over its own socket (trust, local only)."""
    return ["-h", str(layout.socket), "-p", str(port), "-U", "postgres"]


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise UserError(f"{what} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def _check_reachable_by_postgres(folder: Path) -> None:
    if os.geteuid() != 0:
        return
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise UserError(
                f"PostgreSQL runs as the user `postgres`, which cannot enter {parent} (mode "
                f"{parent.stat().st_mode & 0o777:o}): choose a --dir it can reach, or `chmod o+x {parent}`"
            )


def _give_to_postgres(*folders: Path) -> None:
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")


# Who may connect, and how: the socket only for the cluster's owner (its folder is 0700, so no other
# OS user reaches it), and over TCP only with a password (the superuser has none: no TCP login).
PG_HBA = """# lstm-textgen: written by `lstm-textgen server start`; rewritten if it ever allows more.
# The socket's folder is 0700: only the cluster's owner (and root) reach it.
local   all   all                   trust
host    all   all   127.0.0.1/32    scram-sha-256
host    all   all   ::1/128         scram-sha-256
"""


def _socket_folder(layout: Layout) -> None:
    """The socket's folder, the cluster owner's alone."""
    _give_to_postgres(layout.socket)
    layout.socket.chmod(0o700)


def secure_access(layout: Layout) -> bool:
    """pg_hba.conf as PG_HBA; True when it had to be rewritten (a cluster made with `trust` by an
    earlier version, or edited since). PostgreSQL reads it again on reload."""
    hba = layout.cluster / "pg_hba.conf"
    if hba.exists() and hba.read_text() == PG_HBA:
        return False
    temporary = hba.with_name("pg_hba.conf.tmp")
    temporary.write_text(PG_HBA)
    if os.geteuid() == 0:
        shutil.chown(temporary, "postgres", "postgres")
    temporary.chmod(0o600)
    os.replace(temporary, hba)
    return True


def postgres_running(layout: Layout) -> bool:
    if not (layout.cluster / "PG_VERSION").exists():
        return False
    status = subprocess.run(pg("pg_ctl", "-D", layout.cluster, "status"), capture_output=True, check=False)
    return status.returncode == 0


def start_postgres(layout: Layout, port: int, password: str) -> str:
    """The private cluster started (created on first use, with the role and both databases);
    returns the database URL the tracking server uses."""
    _check_reachable_by_postgres(layout.root)
    fresh = not (layout.cluster / "PG_VERSION").exists()
    if fresh:
        _give_to_postgres(layout.cluster)
        _socket_folder(layout)
        _run(
            pg(
                "initdb",
                "-D",
                layout.cluster,
                "-U",
                "postgres",
                "--auth-local=trust",  # replaced by PG_HBA before the first start
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ),
            "creating the PostgreSQL cluster (initdb)",
        )
    rewritten = secure_access(layout)
    if postgres_running(layout):
        if rewritten:
            _run(pg("pg_ctl", "-D", layout.cluster, "reload"), "reloading PostgreSQL's pg_hba.conf")
    else:
        _socket_folder(layout)
        options = f"-p {port} -k {layout.socket} -c listen_addresses=127.0.0.1"
        _run(
            pg(
                "pg_ctl",
                "-D",
                layout.cluster,
                "-l",
                layout.cluster / "server.log",
                "-w",
                "-o",
                options,
                "start",
            ),
            f"starting PostgreSQL on 127.0.0.1:{port}",
        )
    _socket_folder(layout)
    if rewritten and fresh is False:
        print(
            "server: PostgreSQL let anyone on this machine connect without a password (trust); now "
            "TCP needs a password (scram-sha-256) and only its owner reaches the socket"
        )
    _create_databases(layout, port, password)
    return f"postgresql://{ROLE}:{password}@127.0.0.1:{port}/{DATABASE}"


def psql(layout: Layout, port: int, sql: str, database: str = "postgres") -> str:
    """One statement as the cluster's superuser, over the cluster's own socket. The statement goes
    through psql's standard input, never its arguments, which `ps` shows every user."""
    command = pg("psql", *on_socket(layout, port), "-d", database, "-tA", "-v", "ON_ERROR_STOP=1", "-f", "-")
    result = subprocess.run(command, input=sql, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise UserError(
            f"psql: {sql.split()[0]} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    return result.stdout.strip()


def _create_databases(layout: Layout, port: int, password: str) -> None:
    quoted = password.replace("'", "''")
    if not psql(layout, port, f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'"):
        psql(layout, port, f"CREATE ROLE {ROLE} LOGIN PASSWORD '{quoted}'")
    else:  # a cluster of an earlier version, made under trust, may hold the role without it
        psql(layout, port, f"ALTER ROLE {ROLE} PASSWORD '{quoted}'")
    for database in (DATABASE, AUTH_DATABASE):
        if not psql(layout, port, f"SELECT 1 FROM pg_database WHERE datname = '{database}'"):
            psql(layout, port, f"CREATE DATABASE {database} OWNER {ROLE}")


def stop_postgres(layout: Layout) -> None:
    if postgres_running(layout):
        _run(pg("pg_ctl", "-D", layout.cluster, "-m", "fast", "-w", "stop"), "stopping PostgreSQL")


# --- the MLflow server ----------------------------------------------------------------------------


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


def server_running(state: ServerState) -> bool:
    return state.pid is not None and store.process_start(state.pid) == state.pid_start


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


SERVICE_ACCOUNT = "lstm-textgen"


@dataclass(frozen=True)
class Account:
    """Who the MLflow server runs as (started as root, never root itself)."""

    uid: int
    gid: int


def service_account(layout: Layout) -> Account | None:
    """None when we are not root (the server runs as us); else the directory's owner, or, where
    that is root, a system account made for it, as Debian's postgresql runs as `postgres`."""
    if os.geteuid() != 0:
        return None
    owner = layout.root.stat()
    if owner.st_uid != 0:
        return Account(owner.st_uid, owner.st_gid)
    import pwd

    try:
        entry = pwd.getpwnam(SERVICE_ACCOUNT)
    except KeyError:
        command = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
        _run(
            [*command, "--shell", "/usr/sbin/nologin", SERVICE_ACCOUNT],
            f"creating the account {SERVICE_ACCOUNT}",
        )
        entry = pwd.getpwnam(SERVICE_ACCOUNT)
    return Account(entry.pw_uid, entry.pw_gid)


def can_run_python(account: Account) -> str | None:
    """Why the account cannot run this venv's Python and import MLflow (None: it can). A Python
    installed under root's home (pyenv in /root, mode 0700) is out of every other account's reach."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import mlflow"],
            user=account.uid,
            group=account.gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
    except PermissionError as exc:
        return str(exc)
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["failed"])[-1]


def grant_reach(account: Account) -> list[Path]:
    """Let the account pass through (x only, by ACL) the folders that keep it from this Python, its
    standard library and its packages, as a pyenv under a 0700 /root does; returns the folders
    granted (none where `setfacl` is missing or nothing blocks)."""
    setfacl = shutil.which("setfacl")
    needed = {Path(os.path.realpath(sys.executable)), Path(sys.base_prefix), Path(sys.prefix)}
    needed |= {Path(folder) for folder in site.getsitepackages()}
    blocked = sorted(
        {
            folder
            for path in needed
            for folder in (path, *path.parents)
            if folder.is_dir() and not folder.stat().st_mode & 0o001 and folder.stat().st_uid != account.uid
        }
    )
    if not setfacl or not blocked:
        return []
    for folder in blocked:
        _run([setfacl, "-m", f"u:{account.uid}:x", str(folder)], f"letting uid {account.uid} pass {folder}")
    return blocked


def hand_over(layout: Layout, state: ServerState, account: Account) -> dict[str, str]:
    """What the account needs of the directory: the auth config to read, the artifacts and a home to
    write, its own copy of the TLS key (0600). Returns the settings that point at them."""
    home = layout.root / "home"
    home.mkdir(exist_ok=True)
    owned = [home, layout.auth_config]
    if "://" not in state.artifacts and Path(state.artifacts).stat().st_uid != account.uid:
        owned += [Path(state.artifacts), *Path(state.artifacts).rglob("*")]
    moved: dict[str, str] = {}
    if state.tls_cert and state.tls_key:
        folder = layout.root / "tls"
        folder.mkdir(mode=0o700, exist_ok=True)
        for name, path in (("cert", state.tls_cert), ("key", state.tls_key)):
            moved[name] = str(folder / f"server.{name}")
            write_text(moved[name], Path(path).read_text(), secret=True)
            owned.append(Path(moved[name]))
        owned.append(folder)
    for path in owned:
        os.chown(path, account.uid, account.gid)
    return {"HOME": str(home), **{f"tls_{name}": path for name, path in moved.items()}}


def start_mlflow(layout: Layout, state: ServerState, database_url: str, secret_key: str) -> int:
    """The tracking server in its own session (stop signals its whole group), as `service_account`;
    returns its pid once /health answers."""
    write_text(layout.auth_config, auth_config(database_url), secret=True)  # the database password
    account = service_account(layout)
    if account and can_run_python(account) and (granted := grant_reach(account)):
        print(
            f"server: the account uid {account.uid} may now pass through (x, not read) "
            f"{', '.join(map(str, granted))} to run {sys.executable}; undo with "
            f"`setfacl -x u:{account.uid} FOLDER`"
        )
    if account and (why := can_run_python(account)):
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
    # MLflow's job runner (GenAI evaluations, seven worker processes) serves nothing of this project
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
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
    deadline = time.monotonic() + START_TIMEOUT_S
    while not healthy(state.uri, state.verify):
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            tail = layout.log.read_text(errors="replace")[-3000:]
            raise UserError(f"the MLflow server did not start; the end of {layout.log}:\n{tail}")
        time.sleep(0.5)
    return process.pid


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
    state.pid_start, state.initialised = store.process_start(state.pid), True
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
    on any machine (`store.close_abandoned_runs`). True when the server answers."""
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
        for run_id in store.close_abandoned_runs():
            print(f"server: run {run_id} was left RUNNING by a process that is gone; marked KILLED")
    return up


# --- backup and restore ---------------------------------------------------------------------------


def _dump(layout: Layout, state: ServerState, database: str, target: Path) -> None:
    result = subprocess.run(
        pg("pg_dump", *on_socket(layout, state.pg_port), "-Fc", database), capture_output=True, check=False
    )
    if result.returncode != 0:
        raise UserError(f"pg_dump {database} failed: {result.stderr.decode(errors='replace')[-2000:]}")
    target.write_bytes(result.stdout)


def backup(root: Path, target: Path) -> None:
    """Both databases (pg_dump, custom format) and the artifact store in one tar file, written
    atomically. PostgreSQL must be running (the MLflow server need not be)."""
    layout = Layout.of(root.resolve())
    state = read_state(layout)
    if state is None or state.database_url is not None:
        raise UserError("backup needs a server of `lstm-textgen server start` with its own PostgreSQL")
    if not postgres_running(layout):
        raise UserError(f"PostgreSQL is not running: `lstm-textgen server start --dir {root}` first")
    target = target.resolve()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with tarfile.open(Path(tmp) / "backup.tar.gz", "w:gz") as archive:
            for database in (DATABASE, AUTH_DATABASE):
                _dump(layout, state, database, Path(tmp) / f"{database}.dump")
                archive.add(Path(tmp) / f"{database}.dump", arcname=f"{database}.dump")
            if "://" not in state.artifacts:
                archive.add(state.artifacts, arcname="artifacts")
        with open(Path(tmp) / "backup.tar.gz", "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(Path(tmp) / "backup.tar.gz", target)
    print(f"server: backed up {layout.root} to {target}")


def restore(root: Path, source: Path, host: str = "127.0.0.1", port: int | None = None) -> ServerState:
    """A new server directory from a backup: a fresh cluster with both databases restored and the
    artifacts unpacked, then started. The admin account and every other account come with it."""
    layout = Layout.of(root.resolve())
    check_transport(host, tls=False, insecure_http=False)  # TLS is set by a later `server start`
    if layout.state.exists() or layout.cluster.exists():
        raise UserError(f"{layout.root} already holds a server: restore into a new directory")
    layout.root.mkdir(parents=True, exist_ok=True)
    state = ServerState(host, port or 5000, free_port(), None, str(layout.artifacts), initialised=True)
    start_postgres(layout, state.pg_port, read_secrets(layout)["database_password"])
    with tempfile.TemporaryDirectory(dir=layout.root) as tmp, tarfile.open(source) as archive:
        archive.extractall(tmp, filter="data")
        for database in (DATABASE, AUTH_DATABASE):
            dump = Path(tmp) / f"{database}.dump"
            _give_to_postgres(Path(tmp))
            _run(
                pg(
                    "pg_restore",
                    *on_socket(layout, state.pg_port),
                    "--no-owner",
                    f"--role={ROLE}",
                    "-d",
                    database,
                    dump,
                ),
                f"pg_restore {database}",
            )
        if (Path(tmp) / "artifacts").exists():
            shutil.move(Path(tmp) / "artifacts", layout.artifacts)
    layout.artifacts.mkdir(exist_ok=True)
    write_state(layout, state)
    return start(root, Transport(host, port))


# --- accounts and the client side -------------------------------------------------------------------


def add_user(name: str, password: str, read_only: bool) -> None:
    """A new account on the server of MLFLOW_TRACKING_URI, made with the admin's credentials
    (MLFLOW_TRACKING_USERNAME / _PASSWORD). Every account may read; one that trains gets EDIT on
    the experiment and on every registered model, those made later included."""
    from mlflow.server import get_app_client

    uri = store.tracking_uri()
    if not store.is_server(uri):
        raise UserError("set MLFLOW_TRACKING_URI to the tracking server's http:// address first")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password of {name!r} must have at least {MIN_PASSWORD} characters")
    mlflow = store.configure()
    admin = get_app_client("basic-auth", tracking_uri=uri)
    admin.create_user(name, password)
    if not read_only:
        experiment = mlflow.get_experiment_by_name(store.experiment_name()).experiment_id
        admin.grant_user_permission(name, "experiment", experiment, "EDIT")
        admin.grant_user_permission(name, "registered_model", "*", "EDIT")
    print(f"server: account {name!r} created ({'READ' if read_only else 'EDIT'} on {uri})")


def read_new_password(name: str) -> str:
    """From the terminal without echo, or the first line of stdin (scripts)."""
    import getpass

    if sys.stdin.isatty():
        return getpass.getpass(f"password for {name}: ")
    return sys.stdin.readline().rstrip("\n")


def sync(drop: list[str] | None = None) -> None:
    """Send what earlier runs kept because the server was away (outbox.py); `drop`: forget what
    these runs kept instead (a run the store no longer has)."""
    from lstm_textgen.tracking import outbox

    folder = store.pending_dir()
    for run_id in drop or []:
        with store.file_lock(folder / ".lock"):
            found = outbox.drop(folder, run_id)
        print(
            f"server: {'discarded what run ' + run_id + ' kept' if found else 'nothing kept for ' + run_id}"
        )
    if drop:
        return
    if not any(folder.glob("*.jsonl")):
        print(f"server: nothing waits in {folder}")
        return
    outbox.send_waiting(store.configure().MlflowClient())
    left = sorted(path.stem for path in folder.glob("*.jsonl"))
    if left:
        raise UserError(f"server: not sent yet: runs {', '.join(left)} (see above); run sync again later")
    print(f"server: every kept point sent to {store.tracking_uri()}")


# --- the command ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser("lstm-textgen server", description=__doc__, formatter_class=RawText)
    verbs = top.add_subparsers(dest="action", required=True)
    for action, summary in (
        ("start", "start PostgreSQL and the MLflow server (idempotent)"),
        ("stop", "stop both; every run stays in --dir"),
        ("status", "what runs; with credentials set, close runs whose process died"),
        ("backup", "both databases and the artifacts in one file"),
        ("restore", "a new server directory from a backup file, started"),
    ):
        verb = verbs.add_parser(action, help=summary, description=summary)
        verb.add_argument("--dir", type=Path, required=True, help="the server's directory")
        if action in ("start", "restore"):
            verb.add_argument("--host", default="127.0.0.1", help="the address to listen on")
            verb.add_argument("--port", type=int, help="the tracking server's port (first start: 5000)")
        if action == "start":
            verb.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
            verb.add_argument("--tls-key", type=Path, help="... and this private key (PEM)")
            verb.add_argument(
                "--insecure-http",
                action="store_true",
                help="allow plain HTTP on a --host other than loopback (a network you trust)",
            )
            verb.add_argument("--artifacts", help="the artifact store, a folder or URI (DIR/artifacts)")
            verb.add_argument("--database-url", help="an existing PostgreSQL database, not a private one")
        if action == "backup":
            verb.add_argument("--to", type=Path, required=True, help="the backup file (.tar.gz)")
        if action == "restore":
            verb.add_argument("--from", dest="source", type=Path, required=True, help="a backup file")
    user = verbs.add_parser("add-user", help="an account (the admin's credentials in the environment)")
    user.add_argument("name")
    user.add_argument("--read-only", action="store_true", help="may list, compare, serve and score only")
    syncing = verbs.add_parser("sync", help="send the points a run kept while the server was away")
    syncing.add_argument(
        "--drop", action="append", metavar="RUN_ID", help="discard what this run kept instead (repeatable)"
    )
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.action == "start":
        transport = Transport(args.host, args.port, args.tls_cert, args.tls_key, args.insecure_http)
        state = start(args.dir, transport, args.artifacts, args.database_url)
        print(f"server: MLflow tracking server at {state.uri}\n{client_variables(state)}")
    elif args.action == "restore":
        state = restore(args.dir, args.source, args.host, args.port)
        print(f"server: restored {args.source} into {args.dir}, running at {state.uri}")
    elif args.action == "stop":
        stop(args.dir)
        print(f"server: stopped; the runs stay in {args.dir} (`lstm-textgen server start --dir {args.dir}`)")
    elif args.action == "add-user":
        add_user(args.name, read_new_password(args.name), args.read_only)
    elif args.action == "sync":
        sync(args.drop)
    elif args.action == "status":
        raise SystemExit(0 if status(args.dir) else 3)
    else:
        backup(args.dir, args.to)

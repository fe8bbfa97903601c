"""`server backup` and `restore`: the databases (pg_dump) and the artifacts in one archive, restored
into a new cluster with every run, version, alias and account."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from lstm_textgen.errors import UserError
from lstm_textgen.network import free_port
from lstm_textgen.tracking.server.layout import (
    AUTH_DATABASE,
    DATABASE,
    ROLE,
    Layout,
    ServerState,
    read_secrets,
    read_state,
    run_checked,
    write_state,
)
from lstm_textgen.tracking.server.lifecycle import Transport, start
from lstm_textgen.tracking.server.postgres import (
    give_to_postgres,
    on_socket,
    pg,
    postgres_running,
    start_postgres,
)
from lstm_textgen.tracking.server.process import check_transport


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
            give_to_postgres(Path(tmp))
            run_checked(
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

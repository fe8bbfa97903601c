"""The lab's private PostgreSQL cluster: made, started, locked down (`pg_hba.conf`: TCP only with a
password, the socket for its owner only), its roles and databases created through psql's stdin."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from lstm_textgen.errors import UserError
from lstm_textgen.tracking.server.layout import AUTH_DATABASE, DATABASE, ROLE, Layout, run_checked


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


def _check_reachable_by_postgres(folder: Path) -> None:
    if os.geteuid() != 0:
        return
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise UserError(
                f"PostgreSQL runs as the user `postgres`, which cannot enter {parent} (mode "
                f"{parent.stat().st_mode & 0o777:o}): choose a --dir it can reach, or `chmod o+x {parent}`"
            )


def give_to_postgres(*folders: Path) -> None:
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
    give_to_postgres(layout.socket)
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
        give_to_postgres(layout.cluster)
        _socket_folder(layout)
        run_checked(
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
            run_checked(pg("pg_ctl", "-D", layout.cluster, "reload"), "reloading PostgreSQL's pg_hba.conf")
    else:
        _socket_folder(layout)
        options = f"-p {port} -k {layout.socket} -c listen_addresses=127.0.0.1"
        run_checked(
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
        run_checked(pg("pg_ctl", "-D", layout.cluster, "-m", "fast", "-w", "stop"), "stopping PostgreSQL")

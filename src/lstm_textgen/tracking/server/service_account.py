"""Who the MLflow server runs as when started as root: the directory's owner, or a system account made
for it (as Debian's postgresql runs as `postgres`), with what it needs of the directory and of Python."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lstm_textgen.files import write_text
from lstm_textgen.tracking.server.layout import Layout, ServerState, run_checked

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
        run_checked(
            [*command, "--shell", "/usr/sbin/nologin", SERVICE_ACCOUNT],
            f"creating the account {SERVICE_ACCOUNT}",
        )
        entry = pwd.getpwnam(SERVICE_ACCOUNT)
    return Account(entry.pw_uid, entry.pw_gid)


# finds and opens MLflow's package as an import would, without importing it (most of a process start)
MLFLOW_REACHABLE = """import importlib.util, sys
spec = importlib.util.find_spec("mlflow")
if spec is None:
    sys.exit("ModuleNotFoundError: No module named 'mlflow'")
open(spec.origin, "rb").close()
"""


def can_run_python(account: Account) -> str | None:
    """Why the account cannot run this venv's Python and reach MLflow's package (None: it can). A
    Python installed under root's home (pyenv in /root, mode 0700) is out of every other account's
    reach."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", MLFLOW_REACHABLE],
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
        run_checked(
            [setfacl, "-m", f"u:{account.uid}:x", str(folder)], f"letting uid {account.uid} pass {folder}"
        )
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

"""A shared DVC remote on a real server: Debian's sshd on 127.0.0.1 and `dvc-ssh`. One clone runs the
pipeline and pushes; a second clone of the same git repository pulls and reproduces with nothing
re-run; an experiment travels from one clone to the other with `dvc exp push` / `dvc exp pull`."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import copy_of_repro_repo, free_port, require_installed, run, wait_for

pytestmark = pytest.mark.slow

SSHD = Path("/usr/sbin/sshd")
SSHD_CONFIG = """Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
AuthorizedKeysFile {root}/authorized_keys
PidFile {root}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
"""


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An SSH server for the remote: returns the remote's URL and the client's private key."""
    require_installed(SSHD, "openssh-server")
    root = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    port = free_port()
    (root / "sshd_config").write_text(SSHD_CONFIG.format(port=port, root=root))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    log = (root / "sshd.log").open("w")
    server = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")], stderr=log)
    wait_for(lambda: listening(port), "sshd to listen", timeout=30, process=server, log=root / "sshd.log")
    try:
        yield f"ssh://root@127.0.0.1:{port}{root / 'dvc-store'}", root / "client_key"
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


def git(repo: Path, *args: str) -> str:
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo).stdout


def use_key(repo: Path, key: Path) -> None:
    """The key is each machine's own: in .dvc/config.local, never committed."""
    run(["dvc", "remote", "modify", "--local", "store", "keyfile", str(key)], cwd=repo)


def stages_to_run(repo: Path) -> set[str]:
    """The stages `dvc status` names (each on a line of its own, its reasons indented below)."""
    status = run(["dvc", "status"], cwd=repo).stdout
    return {line.rstrip(":") for line in status.splitlines() if line.endswith(":") and not line[0].isspace()}


def stages_run(repo: Path) -> list[str]:
    """The stages `dvc repro` ran."""
    output = run(["dvc", "repro"], cwd=repo).stdout
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_a_second_clone_pulls_and_reproduces_nothing_and_gets_an_experiment(
    sshd: tuple[str, Path], repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    url, key = sshd
    origin = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], cwd=tmp_path)

    # machine A: the pipeline, the remote in .dvc/config (committed), push data and code
    first = copy_of_repro_repo(repro_repo, tmp_path / "a")  # after its `dvc repro`
    run(["dvc", "remote", "add", "-d", "store", url], cwd=first)
    use_key(first, key)
    assert stages_run(first) == ["init"]
    git(first, "add", "-A")
    git(first, "commit", "-qm", "a trained model")
    run(["dvc", "push"], cwd=first)
    git(first, "remote", "add", "origin", str(origin))
    git(first, "push", "-q", "origin", "main")

    # machine B: clone, pull, reproduce: every stage is up to date
    second = tmp_path / "b"
    run(["git", "clone", "-q", str(origin), str(second)], cwd=tmp_path)
    use_key(second, key)
    run(["dvc", "pull"], cwd=second)
    for path in ("data/model/model.pt", "data/prepared/vocab.json", "data/raw/corpus.txt"):
        assert (second / path).read_bytes() == (first / path).read_bytes(), path
    assert stages_run(second) == ["init"]  # `always_changed`: it checks the fine-tuning source
    assert not git(second, "status", "--porcelain", "--untracked-files=no").strip()
    assert stages_to_run(second) <= {"init"}

    # an experiment made on A reaches B with its outputs
    done = run(["dvc", "exp", "run", "-n", "wider", "-S", "model.hidden=48"], cwd=first)
    assert "Running stage 'train'" in done.stdout
    run(["dvc", "exp", "push", "origin", "wider"], cwd=first)
    run(["dvc", "exp", "pull", "origin", "wider"], cwd=second)
    assert "wider" in run(["dvc", "exp", "list", "--name-only"], cwd=second).stdout.split()
    run(["dvc", "exp", "apply", "wider"], cwd=second)
    assert "hidden: 48" in (second / "params.yaml").read_text()
    assert stages_run(second) == ["init"]

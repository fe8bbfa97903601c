"""A lab's tracking service as a team uses it: `lstm-textgen server` starts PostgreSQL and an MLflow
server with accounts on 127.0.0.1; a model trained and registered from one clone is scored, served and
fine-tuned from another through the server alone; a missing or wrong password, or a read-only account,
is refused in one line before any training; the server going away mid-run, or for longer than the run,
loses no point; a backup restores into a new cluster with every run, version and alias."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
from conftest import (
    REPO_ROOT,
    edit_params,
    free_port,
    paced,
    page_ok,
    prepared_tiny_repo,
    require_installed,
    run,
    run_at_once,
    tiny_repo,
    tool_env,
    wait_for,
)

pytestmark = pytest.mark.slow

STARTED: dict[str, str] = {}  # what the lab's first `server start` said on stderr
PASSWORDS = {"admin": "admin-password-lab-1", "trainer": "trainer-password-2", "reader": "reader-password-3"}
MODEL = "lstm-textgen-shakespeare-char"


def server_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "lstm_textgen.apps.cli", "server", *map(str, args)]


@dataclass(frozen=True)
class Lab:
    root: Path  # a folder the `postgres` user can enter (PostgreSQL runs as that user)
    uri: str

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    def env(self, user: str | None, repo: Path | None = None, password: str | None = None) -> dict[str, str]:
        env = {
            **tool_env(repo),
            "MLFLOW_TRACKING_URI": self.uri,
            "PYTHONPATH": str((repo or REPO_ROOT) / "src"),
        }
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD"):
            env.pop(key, None)
        if user:
            env["MLFLOW_TRACKING_USERNAME"] = user
            env["MLFLOW_TRACKING_PASSWORD"] = password or PASSWORDS[user]
        return env

    def server(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**self.env("admin"), "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"]}
        return run(server_command(*args, "--dir", self.server_dir), cwd=self.root, env=env, check=check)

    def client(self, user: str = "admin"):
        from mlflow.tracking import MlflowClient

        os.environ.update({k: v for k, v in self.env(user).items() if k.startswith("MLFLOW_TRACKING_")})
        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_installed(Path("/usr/lib/postgresql"), "postgresql")
    root = Path(tempfile.mkdtemp(prefix="lstm-textgen-lab-", dir="/tmp"))
    root.chmod(0o755)
    lab = Lab(root, f"http://127.0.0.1:{free_port()}")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        started = lab.server("start", "--port", lab.uri.rsplit(":", 1)[1])
        STARTED["stderr"] = started.stderr
        assert f"MLFLOW_TRACKING_URI={lab.uri}" in started.stdout
        assert PASSWORDS["admin"] not in started.stdout + started.stderr
        for user, flags in (("trainer", []), ("reader", ["--read-only"])):
            done = subprocess.run(
                server_command("add-user", user, *flags),
                input=PASSWORDS[user] + "\n",
                env=lab.env("admin"),
                capture_output=True,
                text=True,
                check=False,
            )
            assert done.returncode == 0, done.stderr
        yield lab
    finally:
        lab.server("stop", check=False)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def trained(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Clone A: the pipeline run by the trainer against the server; returns the clone and its output."""
    repo = tiny_repo(tmp_path_factory.mktemp("machine-a") / "repo")
    done = run(["dvc", "repro"], cwd=repo, env=lab.env("trainer", repo))
    return repo, done.stdout + done.stderr


def test_start_is_idempotent_and_status_answers(lab: Lab) -> None:
    again = lab.server("start")
    assert "already running" in again.stdout
    status = lab.server("status")
    assert f"MLflow at {lab.uri} running" in status.stdout and "PostgreSQL" in status.stdout
    assert (lab.server_dir / "secrets.json").stat().st_mode & 0o777 == 0o600
    assert requests.get(f"{lab.uri}/api/2.0/mlflow/experiments/search", timeout=10).status_code == 401
    # started as root (as in CI), the MLflow server and its workers run as an account of their own
    pid = json.loads((lab.server_dir / "server.json").read_text())["pid"]
    owners = process_group_uids(pid)
    assert len(owners) >= 2  # mlflow and its uvicorn
    if os.geteuid() == 0:
        assert 0 not in owners.values(), owners
        assert "WARNING: the MLflow server runs as root" not in STARTED.get("stderr", "")


def process_group_uids(group: int) -> dict[int, int]:
    """pid -> real uid of every process in the process group `group`."""
    owners = {}
    for folder in Path("/proc").iterdir():
        if not folder.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            if int((folder / "stat").read_text().rsplit(")", 1)[1].split()[2]) == group:
                status = (folder / "status").read_text().splitlines()
                owners[int(folder.name)] = int(
                    next(line for line in status if line.startswith("Uid:")).split()[1]
                )
    return owners


@pytest.mark.parametrize(
    ("user", "password", "named"),
    [
        (None, None, "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"),
        ("trainer", "not-the-password", "refused the user 'trainer'"),
        ("reader", None, "READ permission"),
    ],
)
def test_credentials_and_permissions_are_checked_before_training(
    lab: Lab,
    repro_repo: tuple[Path, str],
    tmp_path: Path,
    user: str | None,
    password: str | None,
    named: str,
) -> None:
    repo = prepared_tiny_repo(repro_repo, tmp_path / "repo")
    env = lab.env(user, repo, password)
    done = run([sys.executable, "stages/train.py"], cwd=repo, env=env, check=False)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr
    assert "step " not in done.stdout  # refused before any training step


def test_a_model_from_one_clone_is_scored_served_and_finetuned_from_another(
    lab: Lab, trained: tuple[Path, str], tmp_path: Path
) -> None:
    clone_a, output = trained
    assert not (clone_a / "mlruns").exists() and not (clone_a / "mlflow.db").exists()
    client = lab.client()
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert client.get_run(champion.run_id).info.status == "FINISHED"

    # machine B has never seen A's disk: scoring and serving read the model from the server alone
    elsewhere = tmp_path / "machine-b"
    elsewhere.mkdir()
    (elsewhere / "text.txt").write_text("ROMEO: good night\n")
    reader = lab.env("reader")
    scored = run(
        [
            sys.executable,
            "-m",
            "lstm_textgen.apps.cli",
            "score",
            "--json",
            "--model",
            f"models:/{MODEL}@champion",
            "text.txt",
        ],
        cwd=elsewhere,
        env=reader,
    )
    assert json.loads(scored.stdout)["bits_per_character"] > 0
    port = free_port()
    serve = subprocess.Popen(
        [
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}@champion",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "--env-manager",
            "local",
        ],
        cwd=elsewhere,
        env=reader,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: page_ok(f"http://127.0.0.1:{port}/ping"), "the served model", process=serve, pause=0.5
        )
        body = {"dataframe_records": [{"prompt": "ROMEO:", "max_new_tokens": 12}]}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["predictions"][0]["text"]) > 0
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)

    # clone B fine-tunes the champion through the server
    clone_b = tiny_repo(tmp_path / "clone-b")
    edit_params(clone_b / "params.yaml", train={"init_from": f"models:/{MODEL}@champion"})
    run(["dvc", "repro", "train"], cwd=clone_b, env=lab.env("trainer", clone_b))
    finetuned = json.loads((clone_b / "metrics" / "train.json").read_text())["mlflow_run_id"]
    tags = client.get_run(finetuned).data.tags
    assert tags["init_from_model"] == MODEL and tags["init_from_version"] == champion.version
    assert_no_password_in(clone_a, clone_b, output, client)


def assert_no_password_in(clone_a: Path, clone_b: Path, output: str, client) -> None:
    """Credentials never land in params, dvc.lock, metrics, the logs, or MLflow's params and tags."""
    secrets = [PASSWORDS["trainer"], PASSWORDS["admin"]]
    files = [
        p for clone in (clone_a, clone_b) for p in clone.rglob("*") if p.is_file() and ".git" not in p.parts
    ]
    for path in files:
        if path.suffix in (".yaml", ".lock", ".json", ".csv", ".txt", ".md", ".log"):
            text = path.read_text(errors="replace")
            assert not any(secret in text for secret in secrets), path
    assert not any(secret in output for secret in secrets)
    for run_ in client.search_runs([client.get_experiment_by_name("lstm-textgen").experiment_id]):
        logged = json.dumps({**run_.data.params, **run_.data.tags})
        assert not any(secret in logged for secret in secrets), run_.info.run_id


def history_steps(repo: Path) -> dict[int, float]:
    with (repo / "metrics" / "train_history.csv").open() as handle:
        return {int(row["step"]): float(row["val_loss"]) for row in csv.DictReader(handle)}


def assert_every_point_logged(lab: Lab, repo: Path) -> None:
    run_id = json.loads((repo / "metrics" / "train.json").read_text())["mlflow_run_id"]
    client = lab.client()
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
    expected = history_steps(repo)
    assert sorted(logged) == sorted(expected)
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, rel=1e-5), step
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "final_steps" in client.get_run(run_id).data.metrics


def start_training(lab: Lab, repo: Path, **train: object) -> subprocess.Popen[str]:
    # one thread, paced steps: the run only has to last, and the suite's other processes share the
    # cores meanwhile
    edit_params(repo / "params.yaml", train={"eval_every": 50, "eval_batches": 1, "threads": 1, **train})
    return subprocess.Popen(
        paced("stages/train.py"),
        cwd=repo,
        env=lab.env("trainer", repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(process: subprocess.Popen[str], text: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"training ended before printing {text!r}: {process.stderr.read()}")


def test_a_server_away_for_half_a_minute_mid_run_loses_no_point(
    lab: Lab, trained: tuple[Path, str], repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    """The server and its database restarted for half a minute: a training under way logs every point;
    a stage that starts meanwhile waits, saying so once, and finishes; with a wait too short for the
    outage it stops in one line naming the server."""
    repo = prepared_tiny_repo(repro_repo, tmp_path / "repo")
    training = start_training(lab, repo, max_steps=1_000_000, max_minutes=1.5)
    wait_for_line(training, "step 50:")
    lab.server("stop")
    back = time.monotonic() + 30  # several of the run's evaluations fall inside the outage
    try:
        waiting, log = stage_that_starts_while_the_server_is_away(lab, trained[0], tmp_path)
        time.sleep(max(0.0, back - time.monotonic()))
    finally:
        lab.server("start")
    _, err = training.communicate(timeout=300)
    assert training.returncode == 0, err
    assert "kept in" not in err  # everything reached the server once it was back
    assert_every_point_logged(lab, repo)
    assert waiting.wait(timeout=300) == 0, log.read_text()
    assert "answers again" in log.read_text() and "Traceback" not in log.read_text()


def stage_that_starts_while_the_server_is_away(
    lab: Lab, repo: Path, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """`evaluate` with the usual wait (left waiting: returned with its log) and with a wait shorter
    than the outage (stopped, naming the server)."""
    log = tmp_path / "evaluate.log"
    with log.open("w") as output:
        waiting = subprocess.Popen(
            [sys.executable, "stages/evaluate.py"],
            cwd=repo,
            env=lab.env("trainer", repo),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    short = {**lab.env("trainer", repo), "LSTM_TEXTGEN_TRACKING_WAIT_MINUTES": "0.05"}
    gave_up = run([sys.executable, "stages/evaluate.py"], cwd=repo, env=short, check=False)
    assert gave_up.returncode != 0 and "Traceback" not in gave_up.stderr
    assert f"the tracking server {lab.uri} (MLFLOW_TRACKING_URI) does not answer" in gave_up.stderr
    wait_for(
        lambda: "waiting up to 5 minute(s)" in log.read_text(), "the stage to wait", process=waiting, log=log
    )
    return waiting, log


def test_an_outage_longer_than_the_run_is_sent_by_sync(
    lab: Lab, repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    repo = prepared_tiny_repo(repro_repo, tmp_path / "repo")
    training = start_training(lab, repo, max_steps=1_000_000, max_minutes=0.5)
    wait_for_line(training, "step 50:")
    lab.server("stop")
    try:
        _, err = training.communicate(timeout=300)
        assert training.returncode == 0, err
        assert "kept in" in err and "lstm-textgen server sync" in err
        assert list((repo / "mlflow-pending").glob("*/*.jsonl"))
    finally:
        lab.server("start")
    synced = run(server_command("sync"), cwd=repo, env=lab.env("trainer", repo))
    assert "sent" in synced.stdout + synced.stderr
    assert not list((repo / "mlflow-pending").glob("*/*.jsonl"))
    assert_every_point_logged(lab, repo)


def test_a_backup_restores_every_run_version_and_alias(lab: Lab, trained: tuple[Path, str]) -> None:
    backup = lab.root / "lab-backup.tar.gz"
    lab.server("backup", "--to", str(backup))
    restored = Lab(lab.root, f"http://127.0.0.1:{free_port()}")
    target = lab.root / "restored"
    env = lab.env("admin")
    run(
        server_command(
            "restore", "--dir", target, "--from", backup, "--port", restored.uri.rsplit(":", 1)[1]
        ),
        cwd=lab.root,
        env=env,
    )
    try:
        old, new = lab.client(), restored.client()
        experiment = old.get_experiment_by_name("lstm-textgen").experiment_id
        old_runs = {r.info.run_id: r for r in old.search_runs([experiment])}
        new_runs = {r.info.run_id: r for r in new.search_runs([experiment])}
        assert sorted(old_runs) == sorted(new_runs)
        for run_id, before in old_runs.items():
            assert new_runs[run_id].data.metrics == before.data.metrics
            assert new_runs[run_id].info.status == before.info.status
        versions = {v.version for v in old.search_model_versions(f"name='{MODEL}'")}
        assert {v.version for v in new.search_model_versions(f"name='{MODEL}'")} == versions
        champion = old.get_model_version_by_alias(MODEL, "champion").version
        assert new.get_model_version_by_alias(MODEL, "champion").version == champion
        import mlflow.pyfunc

        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(restored.uri)
        try:
            assert mlflow.pyfunc.load_model(f"models:/{MODEL}@champion") is not None  # artifacts restored
        finally:
            mlflow.set_tracking_uri(previous)
        reader = restored.env("reader")  # accounts came along
        answer = requests.get(
            f"{restored.uri}/api/2.0/mlflow/experiments/search",
            params={"max_results": 5},
            auth=(reader["MLFLOW_TRACKING_USERNAME"], reader["MLFLOW_TRACKING_PASSWORD"]),
            timeout=10,
        )
        assert answer.status_code == 200
    finally:
        run(server_command("stop", "--dir", target), cwd=lab.root, env=env, check=False)


# Two machines register at the same moment: each a process with its own host name in the run's tags.
REGISTER = """
import socket, sys, time
from pathlib import Path
from lstm_textgen.tracking import registry
socket.gethostname = lambda: sys.argv[4]  # the machine this process stands for
start, run_id, loss = float(sys.argv[1]), sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
registry.register(
    Path(sys.argv[5]), run_id, sys.argv[6],
    example_prompt="ROMEO:", val_loss=loss, version_tags={"corpus": "c", "level": "char"},
)
"""


@pytest.mark.parametrize("losses", [(2.0, 1.0), (1.0, 2.0)])
def test_two_machines_registering_at_once_leave_the_best_champion(
    lab: Lab, trained: tuple[Path, str], losses: tuple[float, float]
) -> None:
    repo, _ = trained
    client = lab.client()
    experiment = client.get_experiment_by_name("lstm-textgen").experiment_id
    runs = [client.create_run(experiment, run_name=f"machine-{i}").info.run_id for i in range(2)]
    name = "race-" + "-".join(f"{loss:g}" for loss in losses)  # a new registered model each time
    env = lab.env("trainer", repo)
    checkpoint = str(repo / "data" / "model" / "model.pt")
    arguments = [[runs[i], str(losses[i]), f"machine-{i}", checkpoint, name] for i in range(2)]
    writers = run_at_once(REGISTER, arguments, repo, env, delay=10, timeout=300)  # past torch's import
    for writer in writers:
        assert writer.returncode == 0, writer.stderr[-4000:]
    best_run = runs[losses.index(min(losses))]
    assert client.get_model_version_by_alias(name, "champion").run_id == best_run
    for run_id in runs:
        assert client.get_run(run_id).data.tags["owner.host"].startswith("machine-")


def test_status_closes_a_run_whose_machine_stopped_beating(lab: Lab) -> None:
    client = lab.client()
    experiment = client.get_experiment_by_name("lstm-textgen").experiment_id
    tags = {"owner.host": "gone-machine", "owner.pid": "1", "owner.start": "1"}
    dead = client.create_run(experiment, tags={**tags, "owner.heartbeat": str(int(time.time() - 3600))})
    alive = client.create_run(experiment, tags={**tags, "owner.heartbeat": str(int(time.time()))})
    status = lab.server("status")
    assert dead.info.run_id in status.stdout
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    client.set_terminated(alive.info.run_id)


def test_first_writers_at_the_same_moment_on_the_server_lose_no_run(lab: Lab) -> None:
    """Three processes open a new experiment on the server at once (`dvc queue start -j 3` on a new
    lab): each creates it or finds it, and every run lands."""
    from test_tracking import WRITER

    env = {**lab.env("trainer"), "MLFLOW_EXPERIMENT_NAME": "first-writers"}
    writers = run_at_once(WRITER, [[f"writer-{i}"] for i in range(3)], lab.root, env, delay=8, timeout=120)
    assert [writer.returncode for writer in writers] == [0, 0, 0], [writer.stderr for writer in writers]
    client = lab.client()
    runs = client.search_runs([client.get_experiment_by_name("first-writers").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["writer-0", "writer-1", "writer-2"]
    assert {r.info.status for r in runs} == {"FINISHED"}


# --- the database: nobody in without the password, and no secret where others can read it ---


def psql_as(port: int, host: str | Path, user: str, os_user: str | None = None, password: str | None = None):
    """`SELECT 1` through psql as `user`, over TCP (host 127.0.0.1) or the socket folder, never
    prompting; as another OS user with `os_user`."""
    from lstm_textgen.tracking.server.postgres import postgres_bin

    command = [str(postgres_bin("psql")), "-h", str(host), "-p", str(port), "-U", user, "-d", "postgres"]
    command += ["-w", "-tAc", "SELECT 1"]
    if os_user:
        command = ["runuser", "-u", os_user, "--", *command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password:
        env["PGPASSWORD"] = password
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False, cwd="/")


def assert_locked(server_dir: Path) -> None:
    port = json.loads((server_dir / "server.json").read_text())["pg_port"]
    for user in ("postgres", "mlflow"):  # over TCP without a password: no one, the superuser included
        refused = psql_as(port, "127.0.0.1", user)
        assert refused.returncode != 0 and "password" in refused.stderr, refused
    assert psql_as(port, "127.0.0.1", "postgres", password="postgres").returncode != 0
    other = psql_as(port, server_dir / "socket", "postgres", os_user="nobody")  # another OS user
    assert other.returncode != 0 and "ermission denied" in other.stderr, other
    secrets = json.loads((server_dir / "secrets.json").read_text())
    allowed = psql_as(port, "127.0.0.1", "mlflow", password=secrets["database_password"])
    assert allowed.returncode == 0 and allowed.stdout.strip() == "1", allowed.stderr
    for name in ("secrets.json", "basic_auth.ini"):
        assert (server_dir / name).stat().st_mode & 0o777 == 0o600, name
    assert secrets["database_password"] not in (server_dir / "server.json").read_text()


def test_nobody_reaches_the_database_without_its_password(lab: Lab) -> None:
    assert_locked(lab.server_dir)


class CommandLines:
    """Every command line seen on the machine while the block runs (/proc, polled every few ms)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self) -> None:
        while not self.done.is_set():
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                with contextlib.suppress(OSError):
                    self.seen.add(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            time.sleep(0.005)

    def __enter__(self) -> CommandLines:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def test_a_trust_cluster_is_locked_on_start_and_no_secret_reaches_a_command_line(lab: Lab) -> None:
    """A cluster as an earlier version made it (every local and 127.0.0.1 line `trust`, the socket's
    folder open to all) is locked by the next `server start`, which says so once."""
    second = Lab(lab.root / "second", f"http://127.0.0.1:{free_port()}")
    second.root.mkdir()
    try:
        with CommandLines() as lines:
            second.server("start", "--port", second.uri.rsplit(":", 1)[1])
            second.server("stop")
            hba = second.server_dir / "postgres/pg_hba.conf"
            hba.write_text(
                "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
            )
            (second.server_dir / "socket").chmod(0o777)
            restarted = second.server("start")
            again = second.server("start")
        assert "(trust)" in restarted.stdout and "(trust)" not in again.stdout
        assert_locked(second.server_dir)
        secrets = json.loads((second.server_dir / "secrets.json").read_text())
        shown = "\n".join(lines.seen)
        assert "runuser" in shown or "psql" in shown  # the poll saw the server's own commands
        for secret in (*secrets.values(), PASSWORDS["admin"]):
            assert secret not in shown
    finally:
        second.server("stop", check=False)


def stage_process(pipeline: psutil.Process, script: str, timeout: float = 300) -> psutil.Process:
    """The Python process running `script` under `dvc repro`, as soon as it exists: the script is its
    own argument there, not part of the `sh -c "python ..."` line of the shell that DVC starts it with."""
    found: list[psutil.Process] = []

    def started() -> bool:
        for child in pipeline.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if script in child.cmdline()[1:2]:
                    found.append(child)
        return bool(found)

    wait_for(started, f"{script} to start", timeout=timeout, pause=0.02)
    return found[0]


def wait_until_it_talks_to(process: psutil.Process, port: int, timeout: float = 300) -> None:
    def talks() -> bool:
        return any(c.raddr and c.raddr.port == port for c in process.net_connections(kind="tcp"))

    wait_for(talks, f"a connection to port {port}", timeout=timeout, pause=0.02)


@contextlib.contextmanager
def frozen(process: psutil.Process) -> Iterator[None]:
    """SIGSTOP while the block runs: the stage is held at this exact point of its work."""
    process.suspend()
    try:
        yield
    finally:
        process.resume()


def test_restarts_mid_evaluate_and_as_register_starts_lose_nothing(
    lab: Lab, trained: tuple[Path, str]
) -> None:
    """The server and its database restarted twice during `dvc repro`: once while evaluate is between
    its calls to the server (after the first), once as register starts. The pipeline waits both out:
    every evaluation metric is on the run, the new version registered, the champion where it says."""
    repo, _ = trained
    port = int(lab.uri.rsplit(":", 1)[1])
    run_id = json.loads((repo / "metrics" / "train.json").read_text())["mlflow_run_id"]
    client = lab.client()
    versions = {v.version for v in client.search_model_versions(f"name='{MODEL}'")}
    pipeline = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", "evaluate", "register"],
        cwd=repo,
        env=lab.env("trainer", repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        dvc = psutil.Process(pipeline.pid)
        evaluate = stage_process(dvc, "stages/evaluate.py")
        wait_until_it_talks_to(evaluate, port)
        with frozen(evaluate):  # mid-stage: its first call answered, the metrics not yet sent
            lab.server("stop")
        time.sleep(20)
        lab.server("start")
        register = stage_process(dvc, "stages/register.py")
        with frozen(register):
            lab.server("stop")
        time.sleep(20)
    finally:
        lab.server("start")
    output, _ = pipeline.communicate(timeout=600)
    assert pipeline.returncode == 0, output
    assert "Traceback" not in output and "kept in" not in output, output
    assert "waiting up to" in output and "answers again" in output  # register saw the outage, said so
    evaluated = json.loads((repo / "metrics" / "evaluate.json").read_text())
    logged = client.get_run(run_id).data.metrics
    assert logged["eval.val.loss"] == pytest.approx(evaluated["val"]["loss"], rel=1e-6)
    assert logged["eval.test.bits_per_character"] == pytest.approx(
        evaluated["test"]["bits_per_character"], rel=1e-6
    )
    registered = json.loads((repo / "metrics" / "register.json").read_text())
    now = {v.version for v in client.search_model_versions(f"name='{MODEL}'")}
    assert now - versions == {str(registered["version"])}
    assert client.get_model_version_by_alias(MODEL, "champion").version == str(registered["champion_version"])


# --- how the server is reached: loopback or TLS, one start per directory, a port of its own ---


def test_start_refuses_plain_http_off_loopback_a_taken_port_and_a_second_start(
    lab: Lab, tmp_path: Path
) -> None:
    import fcntl

    from conftest import file_server

    fresh = Lab(lab.root / "refusals", f"http://127.0.0.1:{free_port()}")
    fresh.root.mkdir()
    plain = fresh.server("start", "--host", "0.0.0.0", check=False)
    assert plain.returncode != 0 and "Traceback" not in plain.stderr
    assert "--tls-cert CERT.pem --tls-key KEY.pem" in plain.stderr and "--insecure-http" in plain.stderr
    with file_server(tmp_path) as other:  # something else answers on the port
        taken = fresh.server("start", "--port", other.rsplit(":", 1)[1], check=False)
    assert taken.returncode != 0 and "already answers, and not with this directory's server" in taken.stderr
    assert not (fresh.server_dir / "postgres").exists()  # refused before anything started
    fresh.server_dir.mkdir(exist_ok=True)
    with (fresh.server_dir / ".server.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        second = fresh.server("start", check=False)
    assert second.returncode != 0 and "another `lstm-textgen server` command is starting" in second.stderr


def test_training_registering_and_loading_over_https_with_a_self_signed_certificate(
    lab: Lab, tmp_path: Path
) -> None:
    tls = Lab(lab.root / "tls", f"https://127.0.0.1:{free_port()}")
    tls.root.mkdir()
    cert, key = tls.root / "server.pem", tls.root / "server.key"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", *subject]
    run([*openssl, "-keyout", str(key), "-out", str(cert)], cwd=tls.root)
    port = tls.uri.rsplit(":", 1)[1]
    try:
        started = tls.server("start", "--port", port, "--tls-cert", str(cert), "--tls-key", str(key))
        assert f"MLFLOW_TRACKING_URI={tls.uri}" in started.stdout
        assert requests.get(f"{tls.uri}/health", verify=str(cert), timeout=10).status_code == 200
        with pytest.raises(requests.exceptions.SSLError):  # a client that does not trust it is refused
            requests.get(f"{tls.uri}/health", timeout=10)
        repo = tiny_repo(tmp_path / "repo")
        env = {**tls.env("admin", repo), "MLFLOW_TRACKING_SERVER_CERT_PATH": str(cert)}
        run(["dvc", "repro"], cwd=repo, env=env)
        registered = json.loads((repo / "metrics/register.json").read_text())
        loaded = run(
            [
                sys.executable,
                "-c",
                "import mlflow.pyfunc, sys; m = mlflow.pyfunc.load_model(sys.argv[1]); "
                "print(m.predict({'prompt': 'ROMEO:', 'max_new_tokens': 5, 'seed': 1})['text'][0])",
                registered["model_uri"],
            ],
            cwd=repo,
            env=env,
        )
        assert len(loaded.stdout.rstrip("\n")) >= 1
    finally:
        tls.server("stop", check=False)


# --- a READ account against the whole tracking API: nothing it may not do succeeds ---

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
# (method, endpoint under /api/2.0/mlflow/, fields): every call that changes what exists or who may
# do what. Creating an experiment or a registered model of one's own is every account's right in
# MLflow (the creator manages it); docs/team.md says so.
WRITES = [
    ("POST", "experiments/delete", ["experiment_id"]),
    ("POST", "experiments/restore", ["experiment_id"]),
    ("POST", "experiments/update", ["experiment_id", "new_name"]),
    ("POST", "experiments/set-experiment-tag", ["experiment_id", "key", "value"]),
    ("POST", "runs/create", ["experiment_id", "run_name"]),
    ("POST", "runs/update", ["run_id", "status"]),
    ("POST", "runs/delete", ["run_id"]),
    ("POST", "runs/log-metric", ["run_id", "key", "value", "timestamp", "step"]),
    ("POST", "runs/log-parameter", ["run_id", "key", "value"]),
    ("POST", "runs/set-tag", ["run_id", "key", "value"]),
    ("POST", "runs/delete-tag", ["run_id", "key"]),
    ("POST", "runs/log-batch", ["run_id", "metrics", "params", "tags"]),
    ("PATCH", "registered-models/update", ["name", "description"]),
    ("POST", "registered-models/rename", ["name", "new_name"]),
    ("DELETE", "registered-models/delete", ["name"]),
    ("POST", "registered-models/alias", ["name", "alias", "version"]),
    ("DELETE", "registered-models/alias", ["name", "alias"]),
    ("POST", "model-versions/create", ["name", "source", "run_id"]),
    ("PATCH", "model-versions/update", ["name", "version", "description"]),
    ("DELETE", "model-versions/delete", ["name", "version"]),
    ("POST", "model-versions/set-tag", ["name", "version", "key", "value"]),
    ("POST", "users/create", ["username", "password"]),
    ("PATCH", "users/update-password", ["username", "password"]),
    ("PATCH", "users/update-admin", ["username", "is_admin"]),
    ("DELETE", "users/delete", ["username"]),
    ("POST", "experiments/permissions/create", ["experiment_id", "username", "permission"]),
    ("PATCH", "experiments/permissions/update", ["experiment_id", "username", "permission"]),
    ("DELETE", "experiments/permissions/delete", ["experiment_id", "username"]),
    ("POST", "registered-models/permissions/create", ["name", "username", "permission"]),
    ("PATCH", "registered-models/permissions/update", ["name", "username", "permission"]),
]
PREFIXES = ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/")  # the UI's copy of the API is guarded too


def lab_snapshot(lab: Lab) -> dict[str, dict[str, str]]:
    """Everything a write could change, by id, read as the admin."""
    client = lab.client("admin")
    experiments = client.search_experiments(view_type=3)
    ids = [e.experiment_id for e in experiments]
    runs = client.search_runs(ids, run_view_type=3, max_results=1000)
    models = client.search_registered_models()
    versions = client.search_model_versions()
    return {
        "experiments": {
            e.experiment_id: repr((e.name, e.lifecycle_stage, sorted(e.tags.items()))) for e in experiments
        },
        "runs": {r.info.run_id: repr((r.info.status, r.info.lifecycle_stage, r.data)) for r in runs},
        "models": {m.name: repr((m.description, m.aliases)) for m in models},
        "versions": {f"{v.name}/{v.version}": repr((v.description, v.tags, v.status)) for v in versions},
    }


def kept(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """`after` restricted to what existed `before` (an account's own new experiment is no change)."""
    return {kind: {key: after[kind].get(key, "gone") for key in items} for kind, items in before.items()}


def test_a_read_account_changes_nothing_whatever_it_sends(lab: Lab, trained: tuple[Path, str]) -> None:
    """Generated calls to every endpoint that writes, through both copies of the API, with this lab's
    real ids (runs, experiments, model, version, alias, accounts) and junk: none succeeds, and
    every run, experiment, model, version and alias is as it was."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = lab.client("admin")
    champion = client.get_model_version_by_alias(MODEL, "champion")
    real = {
        "experiment_id": [e.experiment_id for e in client.search_experiments()],
        "run_id": [champion.run_id],
        "name": [MODEL],
        "version": [champion.version],
        "alias": ["champion"],
        "username": ["trainer", "admin", "reader"],  # the first: another's account
        "permission": ["MANAGE", "EDIT"],
        "source": [champion.source],
        "status": ["FAILED"],
        "is_admin": [True],
    }
    junk = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False),
        st.text(max_size=40),
        st.lists(st.text(max_size=5), max_size=3),
        st.just([{"key": "k", "value": "v", "timestamp": 0, "step": 0}]),
    )

    def field(name: str) -> st.SearchStrategy[object]:
        return st.one_of(st.sampled_from(real[name]), junk) if name in real else junk

    calls = st.tuples(st.sampled_from(WRITES), st.sampled_from(PREFIXES)).flatmap(
        lambda chosen: st.tuples(st.just(chosen), st.fixed_dictionaries({f: field(f) for f in chosen[0][2]}))
    )
    before = lab_snapshot(lab)
    auth = ("reader", PASSWORDS["reader"])

    def send(method: str, path: str, body: dict[str, object]) -> requests.Response:
        return requests.request(method, lab.uri + path, json=body, auth=auth, timeout=30)

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=not os.environ.get("FUZZ_EXPLORE"),
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(calls)
    def fuzz(case: tuple[tuple[tuple[str, str, list[str]], str], dict[str, object]]) -> None:
        ((method, endpoint, _), prefix), body = case
        answer = send(method, prefix + endpoint, body)
        assert not answer.ok, (method, prefix + endpoint, body, answer.status_code, answer.text[:300])

    fuzz()
    for method, endpoint, fields in WRITES:  # each once with every id real: refused for lack of right
        for prefix in PREFIXES:
            answer = send(method, prefix + endpoint, {f: real[f][0] if f in real else "x" for f in fields})
            assert answer.status_code in (401, 403), (
                prefix + endpoint,
                answer.status_code,
                answer.text[:300],
            )
    upload = requests.put(
        f"{lab.uri}/api/2.0/mlflow-artifacts/artifacts/{champion.run_id}/intruder.txt",
        data=b"x",
        auth=auth,
        timeout=30,
    )
    assert not upload.ok
    assert kept(before, lab_snapshot(lab)) == before
    read = f"{lab.uri}/api/2.0/mlflow/registered-models/get"
    assert requests.get(read, params={"name": MODEL}, auth=auth, timeout=30).ok  # reading still works

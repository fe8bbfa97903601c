"""The MLflow store as several processes and a tracking server see it: parallel first writers on a new
SQLite store lose no run, and with a tracking server the artifacts (models included) go to the server,
not to the training machine's disk."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, free_port, run_at_once, runs_by_name, tool_env, tracking_store, wait_for_page

from lstm_textgen.tracking.store import SERVER_DEFAULTS

# Each writer waits for the same moment, then opens the store and logs one finished run.
WRITER = """
import sys, time
from lstm_textgen.tracking import liveness, store
import mlflow
start, name = float(sys.argv[1]), sys.argv[2]
time.sleep(max(0.0, start - time.time()))
with liveness.active_run(run_name=name):
    mlflow.log_metric("x", 1.0)
"""


def test_parallel_first_writers_on_a_new_store_lose_no_run(tmp_path: Path) -> None:
    """MLflow creates a SQLite store's schema on first use; writers starting together (`dvc queue
    start -j 2` on a new clone) raced on that migration and all but one lost their run."""
    env = {**tool_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    writers = run_at_once(WRITER, [[f"writer-{i}"] for i in range(3)], tmp_path, env, delay=8, timeout=120)
    assert [writer.returncode for writer in writers] == [0, 0, 0], [writer.stderr for writer in writers]
    runs = runs_by_name(tmp_path / "mlflow.db")
    assert sorted(runs) == ["writer-0", "writer-1", "writer-2"]
    assert {run.info.status for run in runs.values()} == {"FINISHED"}


@pytest.mark.slow
def test_with_a_tracking_server_artifacts_go_to_the_server(tmp_path: Path) -> None:
    port, served = free_port(), tmp_path / "server-artifacts"
    command = [
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(served),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (tmp_path / "server.log").open("w")
    env = {**SERVER_DEFAULTS, **tool_env()}  # as the project's own servers run
    server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        wait_for_page(server, f"http://127.0.0.1:{port}/health", tmp_path / "server.log")
        clone = tmp_path / "clone"
        (clone / ".git").mkdir(parents=True)  # the repository root a clone has
        (clone / "model.txt").write_text("weights\n")
        logger = (
            "from lstm_textgen.tracking import liveness\nimport mlflow\n"
            "with liveness.active_run(run_name='remote'):\n    mlflow.log_artifact('model.txt')\n"
        )
        env = {
            **tool_env(),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
            "PYTHONPATH": str(REPO_ROOT / "src"),
        }
        done = subprocess.run(
            [sys.executable, "-c", logger], cwd=clone, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        assert client.get_experiment_by_name("lstm-textgen").artifact_location.startswith("mlflow-artifacts:")
        assert [p.name for p in served.rglob("model.txt")] == ["model.txt"]
        assert not (clone / "mlruns").exists()  # nothing of it stayed on the training machine's disk
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_champion_settles_on_the_best_comparable_version_after_a_stale_write(tmp_path: Path) -> None:
    """Two machines registering at once share no lock: one may move the alias to its own version after
    the other moved it to a better one. Settling after each write puts it back on the best."""
    from mlflow.tracking import MlflowClient

    from lstm_textgen.tracking.registry import CHAMPION, settle_champion

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    losses = {"1": "2.0", "2": "1.0", "3": "0.5"}
    for number, loss in losses.items():
        client.create_model_version("m", source=str(tmp_path / number))
        tags = {"corpus": "c", "level": "char", "lowercase": "false", "val_loss": loss}
        if number == "3":
            tags["corpus"] = "other"  # better, but not comparable: never the champion of corpus c
        for key, value in tags.items():
            client.set_model_version_tag("m", number, key, value)
    client.set_registered_model_alias("m", CHAMPION, "1")  # the stale write: v2 is better
    assert settle_champion(client, "m") == 2
    assert int(client.get_model_version_by_alias("m", CHAMPION).version) == 2
    assert settle_champion(client, "m") == 2  # settled: nothing moves


def test_a_run_whose_machine_stopped_beating_is_closed_and_a_live_one_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another host's run cannot be checked by its pid: its heartbeat tells. This host's runs are
    still checked by pid (a dead one is closed at once)."""
    from mlflow.tracking import MlflowClient

    from lstm_textgen.tracking import liveness, store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    now = time.time()
    owners = {
        "stale-elsewhere": {
            "owner.host": "gpu-node-7",
            "owner.pid": "1",
            "owner.heartbeat": f"{now - 3600:.0f}",
        },
        "live-elsewhere": {
            "owner.host": "gpu-node-7",
            "owner.pid": "1",
            "owner.heartbeat": f"{now - 60:.0f}",
        },
        "old-version-elsewhere": {"owner.host": "gpu-node-7", "owner.pid": "1"},
        "dead-here": {**liveness.owner_tags(), "owner.pid": "999999999", "owner.start": "0"},
    }
    with tracking_store(tmp_path):
        experiment = store.configure().get_experiment_by_name("lstm-textgen").experiment_id
        ids = {
            name: client.create_run(experiment, tags=tags, run_name=name).info.run_id
            for name, tags in owners.items()
        }
        closed = liveness.close_abandoned_runs()
    assert sorted(closed) == sorted([ids["stale-elsewhere"], ids["dead-here"]])
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {
        "stale-elsewhere": "KILLED",
        "live-elsewhere": "RUNNING",
        "old-version-elsewhere": "RUNNING",
        "dead-here": "KILLED",
    }
    assert (
        "gpu-node-7:1 ended without closing the run"
        in client.get_run(ids["stale-elsewhere"]).data.tags["error"]
    )


def test_an_open_run_renews_its_heartbeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from lstm_textgen.tracking import liveness, store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking_store(tmp_path):
        mlflow = store.configure()
        run_id = client.create_run(mlflow.get_experiment_by_name("lstm-textgen").experiment_id).info.run_id
        client.set_tag(run_id, "owner.heartbeat", "0")
        with liveness.heartbeat(run_id, every_s=0.1):
            time.sleep(1.0)
    assert float(client.get_run(run_id).data.tags["owner.heartbeat"]) > time.time() - 60


def test_a_training_run_logs_the_machine_as_system_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's system metrics (CPU, memory) while a run is open, as `system/*` curves; stopping them
    waits for nothing."""
    from mlflow.tracking import MlflowClient

    from lstm_textgen.tracking import store
    from lstm_textgen.tracking.training_run import system_metrics

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking_store(tmp_path):
        mlflow = store.configure()
        run_id = client.create_run(mlflow.get_experiment_by_name("lstm-textgen").experiment_id).info.run_id
        with system_metrics(run_id):
            time.sleep(2.0)
    logged = client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in logged and "system/system_memory_usage_megabytes" in logged


@pytest.mark.parametrize(
    "garbled",
    [
        {"owner.heartbeat": "x"},
        {"owner.heartbeat": "nan"},
        {"owner.heartbeat": "-inf"},
        {"owner.host": "HERE", "owner.pid": "x", "owner.heartbeat": "1"},
        {"owner.host": "HERE", "owner.pid": "1e400"},
        {"owner.host": "HERE", "owner.pid": "-5"},
    ],
)
def test_owner_tags_that_do_not_parse_prove_nothing_and_close_no_run(garbled: dict[str, str]) -> None:
    """Any EDIT account can set a run's tags: a garbled one neither crashes the next training start
    nor gets the run closed as abandoned."""
    import socket

    from lstm_textgen.tracking.liveness import owner_alive

    tags = {k: socket.gethostname() if v == "HERE" else v for k, v in garbled.items()}
    if tags.get("owner.heartbeat") == "1":  # a valid, stale heartbeat beside a garbled pid: dead
        assert owner_alive(tags) is False
    else:
        assert owner_alive(tags) is True
    assert owner_alive({"owner.heartbeat": "1"}) is False  # a real stale heartbeat still counts

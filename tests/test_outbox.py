"""The outbox a training run logs through: points queued while the store is away arrive in order once
it is back, in batches; what is still unsent when the run closes is kept on disk and sent once by
`send_pending` to a real MLflow store, skipping the points it already holds. The store standing in for
a server that is away is a client that refuses (what is tested is the outbox, not MLflow)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from conftest import tracking_store

from lstm_textgen.tracking import outbox
from lstm_textgen.tracking.outbox import Outbox


class AwayClient:
    """Refuses every call until `back` is set, then records what it is sent."""

    def __init__(self) -> None:
        self.back = threading.Event()
        self.calls: list[tuple[str, Any]] = []

    def _answer(self, name: str, payload: Any) -> None:
        if not self.back.is_set():
            raise ConnectionError("the server is away")
        self.calls.append((name, payload))

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self._answer("batch", [(m.key, m.step, m.value) for m in metrics] or [(t.key, t.value) for t in tags])

    def log_artifact(self, run_id: str, path: str) -> None:
        self._answer("artifact", Path(path).name)

    def set_terminated(self, run_id: str, status: str, end_time: int) -> None:
        self._answer("end", status)


def test_points_logged_while_the_store_is_away_arrive_in_order_and_batched(
    monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(outbox, "RETRY_PAUSE_S", 0.05)
    client = AwayClient()
    box = Outbox("run", tmp_path / "pending", client=client)
    for step in range(1, 51):
        box.log_metrics({"val_loss": 1.0 / step, "lr": 0.1}, step=step)
    box.end("FINISHED")
    client.back.set()
    assert box.close(wait_s=10) == []
    sent = [point for name, batch in client.calls if name == "batch" for point in batch]
    assert [(key, step) for key, step, _ in sent] == [
        (k, s) for s in range(1, 51) for k in ("val_loss", "lr")
    ]
    assert len(client.calls) < 50  # the queued points went in a few requests, not one each
    assert client.calls[-1] == ("end", "FINISHED")
    assert not (tmp_path / "pending").exists()


def test_what_a_run_could_not_send_is_kept_and_sent_once_later(monkeypatch, tmp_path: Path) -> None:
    import mlflow

    monkeypatch.setattr(outbox, "RETRY_PAUSE_S", 0.05)
    (tmp_path / ".git").mkdir()
    artifact = tmp_path / "loss.png"
    artifact.write_bytes(b"png")
    with tracking_store(tmp_path):
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("kept", artifact_location=(tmp_path / "mlruns").as_uri())
        run_id = client.create_run(experiment).info.run_id
        client.log_metric(run_id, "val_loss", 0.5, step=1)  # this one reached the store before the outage
        box = Outbox(run_id, tmp_path / "pending", client=AwayClient())
        for step in (1, 2, 3):
            box.log_metrics({"val_loss": 1.0 / (step + 1)}, step=step)
        box.log_artifact(artifact)
        box.end("FINISHED")
        unsent = box.close(wait_s=0.5)
        assert [item["kind"] for item in unsent] == ["metrics", "metrics", "metrics", "artifact", "end"]
        assert outbox.describe(unsent) == "3 metric points (steps 1..3); artifacts loss.png; the run's end"
        kept = [
            json.loads(line) for line in (tmp_path / "pending" / f"{run_id}.jsonl").read_text().splitlines()
        ]
        assert len(kept) == 5
        artifact.write_bytes(b"replaced by the next run")  # the kept copy is what gets sent

        lines = outbox.send_pending(client, tmp_path / "pending")
        assert len(lines) == 1 and run_id in lines[0]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_loss"))
        assert history == [(1, 0.5), (2, 1 / 3), (3, 0.25)]  # step 1 held already: not sent twice
        assert client.get_run(run_id).info.status == "FINISHED"
        stored = Path(client.download_artifacts(run_id, "loss.png", str(tmp_path / "back")))
        assert stored.read_bytes() == b"png"
        assert outbox.send_pending(client, tmp_path / "pending") == []


def test_a_kept_run_the_store_lacks_is_set_aside_once_and_blocks_nothing(monkeypatch, tmp_path: Path) -> None:
    """Points kept for a run the store does not hold (deleted, or kept for another server) are set
    aside with the way to discard them; the other kept runs are sent; the next command sees nothing."""
    import mlflow

    from lstm_textgen.tracking import store
    from lstm_textgen.tracking.outbox import sync

    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking_store(tmp_path):
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("kept", artifact_location=(tmp_path / "mlruns").as_uri())
        real = client.create_run(experiment).info.run_id
        pending = store.pending_dir()
        assert (
            pending.parent == tmp_path / "mlflow-pending"
            and "sqlite:///" in (pending / "store.txt").read_text()
        )
        assert store.pending_dir("http://other:5000") != pending  # another server, another folder
        for run_id in ("0" * 32, real):
            outbox.keep(pending, run_id, [outbox.entry("metrics", values={"val_loss": 0.5}, step=1)])
        lines = outbox.send_pending(client, pending)
        assert any("set aside" in line and f"--drop {'0' * 32}" in line for line in lines), lines
        assert any(f"missed of run {real}" in line for line in lines)
        assert [m.value for m in client.get_metric_history(real, "val_loss")] == [0.5]
        assert outbox.send_pending(client, pending) == []  # reported once
        sync(drop=["0" * 32])
        assert not list(pending.rglob("*.jsonl"))

"""A training run's logging, sent to MLflow by one background thread and never lost.

Training never waits on the tracking store: each point of the curves, tag, artifact and the run's end
goes into a queue that one thread sends in order. While a tracking server is away the thread sits in
MLflow's own retries (about four minutes per call) and catches up when it is back. What is still
unsent when the run closes (an outage longer than the training) is written to a file beside the store,
`mlflow-pending/RUN_ID.jsonl` (artifacts copied next to it), and `send_pending` — called by the next
command that opens the store, or `lstm-textgen server sync` — sends it, skipping the points the server
already holds. MLflow's asynchronous logging is not enough alone: with few retries it drops points
silently."""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lstm_textgen.files import write_text

# How long closing a run waits for the queue to drain before keeping the rest on disk.
CLOSE_WAIT_S = 30.0
RETRY_PAUSE_S = 2.0
BATCH = 1000  # MLflow's limit of metrics per log_batch call


def entry(kind: str, **payload: Any) -> dict[str, Any]:
    return {"kind": kind, "timestamp": int(time.time() * 1000), **payload}


class Outbox:
    """The queue of one run and the thread that sends it (`send` does one entry)."""

    def __init__(self, run_id: str, pending_dir: Path) -> None:
        self.run_id, self.pending_dir = run_id, pending_dir
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._in_flight: dict[str, Any] | None = None
        self._abandoned = threading.Event()
        self._thread = threading.Thread(target=self._send_all, name="mlflow-outbox", daemon=True)
        self._thread.start()

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        self._queue.put(entry("metrics", values={k: float(v) for k, v in values.items()}, step=step))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._queue.put(entry("tags", values={k: str(v) for k, v in tags.items()}))

    def log_artifact(self, path: Path) -> None:
        self._queue.put(entry("artifact", path=str(Path(path).resolve())))

    def end(self, status: str) -> None:
        self._queue.put(entry("end", status=status))

    def _send_all(self) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        while (item := self._queue.get()) is not None:
            self._in_flight = item
            while not self._abandoned.is_set():
                try:
                    send(client, self.run_id, item)
                    break
                except Exception:  # the server away beyond MLflow's retries: try again
                    time.sleep(RETRY_PAUSE_S)
            if self._abandoned.is_set():
                return
            self._in_flight = None

    def close(self, wait_s: float = CLOSE_WAIT_S) -> list[dict[str, Any]]:
        """Wait up to `wait_s` for the queue to drain; keep what is left in the pending file and
        return it (empty when everything reached the store)."""
        self._queue.put(None)
        self._thread.join(wait_s)
        if not self._thread.is_alive():
            return []
        self._abandoned.set()
        unsent = [self._in_flight] if self._in_flight else []
        while (item := self._drain()) is not None:
            unsent.append(item)
        keep(self.pending_dir, self.run_id, unsent)
        return unsent

    def _drain(self) -> dict[str, Any] | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None


Point = tuple[str, int, float]  # key, step, value


def send(client: Any, run_id: str, item: dict[str, Any], held: set[Point] | None = None) -> None:
    """One entry to the store; `held` names the (key, step, value) points already there."""
    from mlflow.entities import Metric, RunTag

    kind = item["kind"]
    if kind == "metrics":
        points = [
            Metric(key, value, item["timestamp"], item["step"])
            for key, value in item["values"].items()
            if held is None or (key, item["step"], value) not in held
        ]
        for start in range(0, len(points), BATCH):
            client.log_batch(run_id, metrics=points[start : start + BATCH])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in item["values"].items()])
    elif kind == "artifact":
        client.log_artifact(run_id, item["path"])
    elif kind == "end":
        client.set_terminated(run_id, status=item["status"], end_time=item["timestamp"])


def keep(pending_dir: Path, run_id: str, items: list[dict[str, Any]]) -> None:
    """Append to the run's pending file, with a copy of each artifact (the workspace's file may be
    replaced by the next run before the server is back)."""
    copies = pending_dir / run_id
    for item in items:
        if item["kind"] == "artifact":
            copies.mkdir(parents=True, exist_ok=True)
            copy = copies / Path(item["path"]).name
            shutil.copyfile(item["path"], copy)
            item["path"] = str(copy)
    path = pending_dir / f"{run_id}.jsonl"
    before = path.read_text() if path.exists() else ""
    write_text(path, before + "".join(json.dumps(item) + "\n" for item in items))


def pending_runs(pending_dir: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for path in sorted(pending_dir.glob("*.jsonl")):
        yield path.stem, [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def describe(items: list[dict[str, Any]]) -> str:
    points = sum(len(item["values"]) for item in items if item["kind"] == "metrics")
    steps = sorted({item["step"] for item in items if item["kind"] == "metrics"})
    artifacts = [Path(item["path"]).name for item in items if item["kind"] == "artifact"]
    parts = [f"{points} metric points" + (f" (steps {steps[0]}..{steps[-1]})" if steps else "")]
    if artifacts:
        parts.append(f"artifacts {', '.join(artifacts)}")
    if any(item["kind"] == "end" for item in items):
        parts.append("the run's end")
    return "; ".join(parts)


def send_pending(client: Any, pending_dir: Path) -> list[str]:
    """Send every kept entry the store does not hold yet, then forget it; returns one line per run."""
    sent = []
    for run_id, items in pending_runs(pending_dir):
        keys = {key for item in items if item["kind"] == "metrics" for key in item["values"]}
        held = {
            (key, point.step, point.value) for key in keys for point in client.get_metric_history(run_id, key)
        }
        for item in items:
            send(client, run_id, item, held)
        (pending_dir / f"{run_id}.jsonl").unlink()
        shutil.rmtree(pending_dir / run_id, ignore_errors=True)
        sent.append(f"run {run_id}: {describe(items)}")
    return sent

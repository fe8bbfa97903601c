"""A training run's logging, sent to MLflow by one background thread and never lost.

Training never waits on the tracking store: each point of the curves, tag, artifact and the run's end
goes into a queue that one thread sends in order. While a tracking server is away the thread sits in
MLflow's own retries (about four minutes per call) and catches up when it is back. What is still
unsent when the run closes (an outage longer than the training) is written to a file beside the store,
`mlflow-pending/STORE/RUN_ID.jsonl` (one folder per tracking URI; artifacts copied next to it), and
`send_pending` — called by the next command that opens that store, or `lstm-textgen server sync` —
sends it under a lock, skipping the points the server already holds. MLflow's asynchronous logging
is not enough alone: with few retries it drops points silently."""

from __future__ import annotations

import json
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lstm_textgen.errors import UserError
from lstm_textgen.files import write_text
from lstm_textgen.tracking import store

# How long closing a run waits for the queue to drain before keeping the rest on disk.
CLOSE_WAIT_S = 30.0
RETRY_PAUSE_S = 2.0
BATCH = 1000  # MLflow's limit of metrics per log_batch call


def entry(kind: str, **payload: Any) -> dict[str, Any]:
    return {"kind": kind, "timestamp": int(time.time() * 1000), **payload}


class Outbox:
    """The queue of one run and the thread that sends it: consecutive points go in one request."""

    def __init__(self, run_id: str, pending_dir: Path, client: Any = None) -> None:
        self.run_id, self.pending_dir, self._client = run_id, pending_dir, client
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._in_flight: list[dict[str, Any]] = []
        self._held_back: dict[str, Any] | None = None  # taken from the queue, sent after the batch
        self._last_progress = time.monotonic()
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

    def _next_batch(self) -> list[dict[str, Any]] | None:
        """The next entry, with the points queued right behind it when it is points too."""
        first = self._held_back if self._held_back is not None else self._queue.get()
        self._held_back = None
        if first is None or first["kind"] != "metrics":
            return None if first is None else [first]
        batch, points = [first], len(first["values"])
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None or item["kind"] != "metrics" or points + len(item["values"]) > BATCH:
                self._held_back = item
                break
            batch.append(item)
            points += len(item["values"])
        return batch

    def _send_all(self) -> None:
        import mlflow

        client = self._client or mlflow.MlflowClient()
        while not self._abandoned.is_set() and (batch := self._next_batch()) is not None:
            self._in_flight = batch
            while not self._abandoned.is_set():
                try:
                    send_batch(client, self.run_id, batch)
                    break
                except Exception:  # the server away: try again in a moment
                    time.sleep(RETRY_PAUSE_S)
            if not self._abandoned.is_set():
                self._in_flight = []
                self._last_progress = time.monotonic()

    def close(self, wait_s: float = CLOSE_WAIT_S) -> list[dict[str, Any]]:
        """Send what is queued, for as long as the store takes something at least every `wait_s`;
        keep what is left in the pending file and return it (empty when all reached the store)."""
        self._queue.put(None)
        self._last_progress = max(self._last_progress, time.monotonic())
        while self._thread.is_alive() and time.monotonic() - self._last_progress < wait_s:
            self._thread.join(1.0)
        if not self._thread.is_alive():
            return []
        self._abandoned.set()
        unsent = list(self._in_flight)
        if self._held_back is not None:
            unsent.append(self._held_back)
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
        held = held or set()
        missing = [Metric(*row) for row in points(item) if (row[0], row[3], row[1]) not in held]
        for start in range(0, len(missing), BATCH):
            client.log_batch(run_id, metrics=missing[start : start + BATCH])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in item["values"].items()])
    elif kind == "artifact":
        client.log_artifact(run_id, item["path"])
    elif kind == "end":
        client.set_terminated(run_id, status=item["status"], end_time=item["timestamp"])


def send_batch(client: Any, run_id: str, batch: list[dict[str, Any]]) -> None:
    """Entries in one request where they are all points, else one at a time."""
    from mlflow.entities import Metric

    if len(batch) == 1 or any(item["kind"] != "metrics" for item in batch):
        for item in batch:
            send(client, run_id, item)
        return
    client.log_batch(run_id, metrics=[Metric(*point) for item in batch for point in points(item)])


def points(item: dict[str, Any]) -> list[tuple[str, float, int, int]]:
    """A metrics entry as (key, value, timestamp, step) rows, the order of mlflow's `Metric`."""
    return [(key, value, item["timestamp"], item["step"]) for key, value in item["values"].items()]


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
    with store.file_lock(pending_dir / ".lock"):  # `send_pending` of another command may be reading it
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


SET_ASIDE = "set-aside"


def send_waiting(client: Any) -> None:
    """What earlier runs could not log to this store (it was away) is sent, by one process at a
    time, before a command writes to the store (training, registering, `server sync`); a run the
    store does not hold is set aside and said once."""
    folder = store.pending_dir()
    if not any(folder.glob("*.jsonl")):
        return
    with store.file_lock(folder / ".lock"):
        for line in send_pending(client, folder):
            print(f"mlflow: {line}", file=sys.stderr)


def send_pending(client: Any, pending_dir: Path) -> list[str]:
    """Send every kept entry the store does not hold yet, then forget it; returns one line per run.
    A run the store does not have (deleted, or kept for another store) is moved to `set-aside/` and
    reported once; one this account may not write to waits for an account that may; a store that
    is away leaves everything for the next command. None of them stops the command."""
    from mlflow.exceptions import MlflowException

    said = []
    for run_id, items in pending_runs(pending_dir):
        try:
            _send_run(client, run_id, items)
        except MlflowException as exc:
            if exc.error_code == "PERMISSION_DENIED":
                said.append(
                    f"run {run_id}: this account may not write to it; its points wait for one that may"
                )
                continue
            aside = pending_dir / SET_ASIDE
            aside.mkdir(exist_ok=True)
            (pending_dir / f"{run_id}.jsonl").replace(aside / f"{run_id}.jsonl")
            said.append(
                f"run {run_id} is not in this store ({exc.error_code}): what it kept ({describe(items)}) is "
                f"set aside in {aside}; `lstm-textgen server sync --drop {run_id}` discards it"
            )
            continue
        except OSError as exc:  # the server went away meanwhile: the next command sends it
            said.append(f"run {run_id}: not sent yet ({type(exc).__name__}); kept for the next command")
            break
        (pending_dir / f"{run_id}.jsonl").unlink()
        shutil.rmtree(pending_dir / run_id, ignore_errors=True)
        said.append(f"sent what the store had missed of run {run_id}: {describe(items)}")
    return said


def _send_run(client: Any, run_id: str, items: list[dict[str, Any]]) -> None:
    keys = {key for item in items if item["kind"] == "metrics" for key in item["values"]}
    client.get_run(run_id)  # a run the store lacks fails here, before anything is sent
    held = {
        (key, point.step, point.value) for key in keys for point in client.get_metric_history(run_id, key)
    }
    for item in items:
        send(client, run_id, item, held)


def drop_run(pending_dir: Path, run_id: str) -> bool:
    """Forget what `run_id` kept (pending or set aside); False when nothing was kept for it."""
    found = False
    for folder in (pending_dir, pending_dir / SET_ASIDE):
        if (folder / f"{run_id}.jsonl").exists():
            (folder / f"{run_id}.jsonl").unlink()
            found = True
    shutil.rmtree(pending_dir / run_id, ignore_errors=True)
    return found


def sync(drop: list[str] | None = None) -> None:
    """`lstm-textgen server sync`: send what earlier runs kept because the server was away; `drop`:
    forget what these runs kept instead (a run the store no longer has)."""
    folder = store.pending_dir()
    for run_id in drop or []:
        with store.file_lock(folder / ".lock"):
            found = drop_run(folder, run_id)
        print(
            f"server: {'discarded what run ' + run_id + ' kept' if found else 'nothing kept for ' + run_id}"
        )
    if drop:
        return
    if not any(folder.glob("*.jsonl")):
        print(f"server: nothing waits in {folder}")
        return
    send_waiting(store.configure().MlflowClient())
    left = sorted(path.stem for path in folder.glob("*.jsonl"))
    if left:
        raise UserError(f"server: not sent yet: runs {', '.join(left)} (see above); run sync again later")
    print(f"server: every kept point sent to {store.tracking_uri()}")

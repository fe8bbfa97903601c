"""What the served model adjusts in MLflow's scoring server, on the real server app (FastAPI under
uvicorn, in a thread) with a stand-in model that only waits: requests beyond MLflow's six threads
reach `predict` together, and a client that disconnects is seen by its running `predict`."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlflow.pyfunc
import pytest
import requests
from conftest import free_port, wait_for

from lstm_textgen.serving.server_adapter import adapt_scoring_server

# twice the event loop's default pool on this machine (asyncio: min(32, cores + 4)), whatever its cores:
# more requests than MLflow's own threads could ever hold at once
CONCURRENT = 2 * min(32, (os.cpu_count() or 1) + 4)


# The stand-in model, logged from code as the real one is: waits, in `predict`, for CONCURRENT
# requests at once, or for its client to go away.
WAITING = """
import threading, time
import mlflow.models, mlflow.pyfunc, pandas as pd
from lstm_textgen.serving.server_adapter import client_gone

class Waiting(mlflow.pyfunc.PythonModel):
    def __init__(self):
        self.lock, self.inside, self.most, self.gone = threading.Lock(), 0, 0, []

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if model_input["prompt"][0] == "disconnect":
            event = client_gone()
            self.gone.append(event is not None and event.wait(timeout=20))
            return pd.DataFrame({"text": ["-"]})
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        deadline = time.monotonic() + 10
        while self.most < CONCURRENT and time.monotonic() < deadline:
            time.sleep(0.01)
        with self.lock:
            self.inside -= 1
        return pd.DataFrame({"text": ["-"]})

CONCURRENT = COUNT
mlflow.models.set_model(Waiting())
""".replace("COUNT", str(CONCURRENT))


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, Any]]:
    import uvicorn
    from mlflow.pyfunc import scoring_server

    folder = tmp_path_factory.mktemp("waiting")
    (folder / "waiting.py").write_text(WAITING)
    path = folder / "model"
    mlflow.pyfunc.save_model(str(path), python_model=str(folder / "waiting.py"))
    model = mlflow.pyfunc.load_model(str(path))
    adapt_scoring_server(places=2 * CONCURRENT)  # what the served model does in load_context
    app = scoring_server.init(model)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(f"{url}/ping", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    yield url, model.unwrap_python_model()
    server.should_exit = True
    thread.join(timeout=10)


def post(url: str, prompt: str) -> requests.Response:
    return requests.post(f"{url}/invocations", json={"dataframe_records": [{"prompt": prompt}]}, timeout=30)


def test_more_requests_than_mlflows_threads_reach_predict_together(served: tuple[str, Any]) -> None:
    url, model = served
    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        answers = list(pool.map(lambda _: post(url, "wait"), range(CONCURRENT)))
    assert [a.status_code for a in answers] == [200] * CONCURRENT
    assert model.most == CONCURRENT


def test_a_client_that_disconnects_is_seen_by_its_running_predict(served: tuple[str, Any]) -> None:
    url, model = served
    body = json.dumps({"dataframe_records": [{"prompt": "disconnect"}]}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        head = f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        client.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)  # predict is waiting
    wait_for(lambda: model.gone, "predict to see the client gone", timeout=10)
    assert model.gone == [True]

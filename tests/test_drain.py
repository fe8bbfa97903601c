"""Servers that drain on SIGTERM, as a Kubernetes rolling update or `docker stop` sends it: real
server processes on the pipeline's registered champion, requests over HTTP while they generate.

- `mlflow models serve`: the texts being generated finish (200), a request that comes after the
  signal gets 503 with `Retry-After`, /health 503, and the process exits 0.
- `lstm-textgen serve` with no grace period: what is generating is cut short with a 503 that says
  why (a stream ends with that error, then `[DONE]`), and the process exits 0.
- The demo's server exits 0 on SIGTERM, saying it drained."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from conftest import free_port, tool_env, wait_for, wait_for_page

pytestmark = pytest.mark.slow

MODEL = "lstm-textgen-shakespeare-char"
LONG = 2000  # new tokens: seconds of generation for 4 rows on a CPU
# The most work a request may ask (4 rows x 2000 tokens x 300 draws): the tiny test model draws 32
# plain rows of LONG tokens in under a second on a quiet machine, these in several.
SLOW = {"max_new_tokens": LONG, "strategy": "mode", "draws": 300}
LONG_GRACE = {"LSTM_TEXTGEN_DRAIN_SECONDS": "300"}


@pytest.fixture()
def store(repro_repo: tuple[Path, str]) -> Path:
    return repro_repo[0]


def started(command: list[str], store: Path, log: Path, url: str, **env: str) -> subprocess.Popen:
    server_env = tool_env(store) | {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"} | env
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=store, env=server_env, stdout=output, stderr=subprocess.STDOUT
        )
    wait_for_page(process, url, log)
    return process


def in_threads(call, count: int) -> tuple[list[threading.Thread], dict[int, requests.Response]]:
    answers: dict[int, requests.Response] = {}

    def one(i: int) -> None:
        answers[i] = call(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, answers


@pytest.fixture()
def stopped() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts: killed afterwards if the test left them running."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def connections(process: psutil.Process, port: int) -> int:
    """Established connections to `port` in `process`: requests it has accepted."""
    return sum(
        1 for c in process.net_connections(kind="tcp") if c.laddr.port == port and c.status == "ESTABLISHED"
    )


def running_rows(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "lstm_textgen_num_requests_running":
                return sample.value
    return 0.0


def test_mlflow_models_serve_finishes_what_it_generates_refuses_the_rest_and_exits_0(
    store: Path, tmp_path: Path, stopped: list[subprocess.Popen]
) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    command = ["mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion", "-p", str(port)]
    # a grace longer than any load makes the generation: every text finishes
    process = started([*command, "--env-manager", "local"], store, log, f"{url}/ping", **LONG_GRACE)
    stopped.append(process)
    body = {"dataframe_records": [{"prompt": "ROMEO:"}] * 4, "params": SLOW}
    threads, answers = in_threads(
        lambda i: requests.post(f"{url}/invocations", json={**body, "seed": i}, timeout=300), 8
    )
    children = psutil.Process(process.pid).children(recursive=True)
    [scoring] = [child for child in children if "uvicorn" in " ".join(child.cmdline())]
    wait_for(lambda: connections(scoring, port) == 8, "the 8 requests to reach the server")
    time.sleep(1.0)  # their rows join the batch within milliseconds; 32 SLOW rows take seconds
    assert all(thread.is_alive() for thread in threads)  # still generating when the signal comes
    scoring.send_signal(signal.SIGTERM)  # the scoring server's process: MLflow's CLI waits for it
    wait_for(lambda: requests.get(f"{url}/health", timeout=5).status_code == 503, "/health to say 503")
    late = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert late.status_code == 503 and late.headers["Retry-After"] == "1"
    assert "the server is stopping" in late.json()["message"]
    for thread in threads:
        thread.join(timeout=300)
    assert [answers[i].status_code for i in range(8)] == [200] * 8
    assert all(len(row["text"]) == LONG for i in range(8) for row in answers[i].json()["predictions"])
    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert "drained, every text finished" in log.read_text()


def test_lstm_textgen_serve_cuts_what_is_left_when_its_grace_ends_and_exits_0(
    store: Path, tmp_path: Path, stopped: list[subprocess.Popen]
) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    command = ["lstm-textgen", "serve", f"models:/{MODEL}@champion", "--port", str(port)]
    process = started(command, store, log, f"{url}/health", LSTM_TEXTGEN_DRAIN_SECONDS="0")
    stopped.append(process)
    request = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": LONG, "n": 4}
    threads, answers = in_threads(
        lambda i: requests.post(f"{url}/v1/completions", json={**request, "seed": i}, timeout=300), 2
    )
    with requests.post(
        f"{url}/v1/completions", json={**request, "stream": True}, stream=True, timeout=300
    ) as streamed:
        events = streamed.iter_lines()
        first = next(line for line in events if line.startswith(b"data: "))
        wait_for(lambda: running_rows(url) == 12, "the three requests' 12 rows to generate")
        process.send_signal(signal.SIGTERM)
        rest = [line.removeprefix(b"data: ").decode() for line in events if line.startswith(b"data: ")]
    assert json.loads(first.removeprefix(b"data: "))["choices"][0]["text"]
    assert rest[-1] == "[DONE]" and "the server stopped before this text was finished" in rest[-2]
    assert json.loads(rest[-2])["error"]["code"] == "overloaded"
    for thread in threads:
        thread.join(timeout=300)
    for answer in answers.values():
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1", answer.text
        assert "send the request again" in answer.json()["error"]["message"]
    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert "unfinished text(s) cut short" in log.read_text()


def test_the_demo_server_drains_and_exits_0_on_sigterm(store: Path, tmp_path: Path) -> None:
    """SIGTERM as soon as the page answers: gradio may still be checking its own page, a check that
    the closing server failed (exit code 1, a traceback) before the demo took it for the stop it was."""
    port, log = free_port(), tmp_path / "demo.log"
    process = started(["lstm-textgen", "demo", "--port", str(port)], store, log, f"http://127.0.0.1:{port}")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert "demo: drained" in log.read_text()


def test_a_burst_of_sigterms_ends_the_server_with_0(
    store: Path, tmp_path: Path, stopped: list[subprocess.Popen]
) -> None:
    """SIGTERMs in quick succession (`mlflow models serve` passes its own on to a server that already
    got one from its process group): a handler that ran inside itself and took a lock hung forever."""
    port, log = free_port(), tmp_path / "serve.log"
    command = ["lstm-textgen", "serve", f"models:/{MODEL}@champion", "--port", str(port)]
    process = started(command, store, log, f"http://127.0.0.1:{port}/health")
    stopped.append(process)
    for _ in range(200):
        process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]

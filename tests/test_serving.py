"""Registration in the MLflow Model Registry and serving with the real `mlflow models serve`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import free_port, model_server, run, tool_env

pytestmark = pytest.mark.slow
MODEL_NAME = "lstm-textgen-shakespeare-char"


@pytest.fixture()
def store(repro_repo: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    repo, _ = repro_repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    monkeypatch.chdir(repo)
    return repo


def test_registered_champion_loads_and_predicts(store: Path) -> None:
    import mlflow.pyfunc
    import pandas as pd

    registered = json.loads((store / "metrics/register.json").read_text())
    assert registered["model_name"] == MODEL_NAME and registered["promoted"] is True
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    frame = pd.DataFrame({"prompt": ["ROMEO:\n", "To be"], "max_new_tokens": [15, 7], "seed": [1, 1]})
    out = model.predict(frame)
    assert [len(t) for t in out["text"]] == [15, 7]
    again = model.predict(frame)
    assert list(out["text"]) == list(again["text"])  # seeded


def test_champion_moves_only_on_improvement(store: Path) -> None:
    from mlflow.tracking import MlflowClient

    from lstm_textgen.tracking.registry import register

    run_id = json.loads((store / "metrics/train.json").read_text())["mlflow_run_id"]
    client = MlflowClient()
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    old_loss = float(champion.tags["val_loss"])
    tags = {"corpus": "shakespeare", "level": "char", "lowercase": "false"}
    checkpoint = store / "data/model/model.pt"

    equal = register(checkpoint, run_id, MODEL_NAME, "ROMEO:", old_loss + 4e-7, tags)  # ties do not move it
    assert not equal.promoted and "does not beat it" in equal.reason
    worse = register(checkpoint, run_id, MODEL_NAME, "ROMEO:", old_loss + 0.5, tags)
    assert not worse.promoted and "does not beat it" in worse.reason
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == champion.version

    other_corpus = register(
        checkpoint, run_id, MODEL_NAME, "ROMEO:", old_loss - 1.0, {**tags, "corpus": "anna"}
    )
    assert not other_corpus.promoted and "another corpus" in other_corpus.reason

    better = register(checkpoint, run_id, MODEL_NAME, "ROMEO:", old_loss - 0.5, tags)
    assert better.promoted and better.version == worse.version + 2
    assert int(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == better.version
    version = client.get_model_version(MODEL_NAME, str(better.version))
    assert float(version.tags["val_loss"]) == pytest.approx(old_loss - 0.5, abs=1e-5)


def test_registered_model_follows_the_sample_params_and_carries_no_optimizer(store: Path) -> None:
    """The register stage hands today's sample.* params to the model it logs: its defaults and its
    unknown-token policy; the logged checkpoint holds weights, vocabulary and params only."""
    import io

    import mlflow.pyfunc
    import pandas as pd
    import torch
    from mlflow.exceptions import MlflowException

    from lstm_textgen.params import SampleParams
    from lstm_textgen.tracking.registry import register

    run_id = json.loads((store / "metrics/train.json").read_text())["mlflow_run_id"]
    tags = {"corpus": "shakespeare", "level": "char", "lowercase": "false"}
    checkpoint = store / "data/model/model.pt"
    as_trained = register(checkpoint, run_id, MODEL_NAME, "ROMEO:", 10.0, tags)  # worse: not champion
    lenient = SampleParams(unknown="skip", temperature=0.5, top_k=7)
    changed = register(checkpoint, run_id, MODEL_NAME, "ROMEO:", 10.0, tags, sample=lenient)
    frame = pd.DataFrame({"prompt": ["ROMEO\u20ac:"], "max_new_tokens": [5]})
    with pytest.raises(MlflowException, match="not in the vocabulary"):
        mlflow.pyfunc.load_model(as_trained.model_uri).predict(frame)
    served = mlflow.pyfunc.load_model(changed.model_uri)
    assert len(served.predict(frame)["text"][0]) == 5  # the unknown character is skipped
    defaults = {p.name: p.default for p in served.metadata.get_params_schema().params}
    assert defaults["temperature"] == 0.5 and defaults["top_k"] == 7
    logged = served.unwrap_python_model().loaded.checkpoint
    assert {"model", "vocab", "params"} <= set(logged) and not {"optimizer", "history"} & set(logged)
    assert logged["params"]["sample"]["unknown"] == "skip"
    buffer = io.BytesIO()
    torch.save(logged, buffer)
    assert buffer.tell() < checkpoint.stat().st_size / 2


@pytest.fixture(scope="module")
def server(repro_repo: tuple[Path, str]) -> Iterator[str]:
    """One real `mlflow models serve` for the module: the bad requests must not stop it serving."""
    store, _ = repro_repo
    with model_server(store, f"models:/{MODEL_NAME}@champion") as url:
        yield url


def _post(url: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json=body, timeout=60)


def test_served_model_answers_every_request_format(server: str) -> None:
    split = _post(
        server,
        {
            "dataframe_split": {
                "columns": ["prompt", "max_new_tokens"],
                "data": [["ROMEO:\n", 12], ["JULIET:\n", 5]],
            }
        },
    )
    assert split.status_code == 200, split.text
    assert [len(p["text"]) for p in split.json()["predictions"]] == [12, 5]
    records = _post(
        server,
        {"dataframe_records": [{"prompt": "KING:\n", "temperature": 0.5, "seed": 3, "max_new_tokens": 9}]},
    )
    assert records.status_code == 200 and len(records.json()["predictions"][0]["text"]) == 9
    inputs = _post(
        server,
        {"inputs": {"prompt": ["To be", "Now"]}, "params": {"max_new_tokens": 6, "strategy": "greedy"}},
    )
    assert inputs.status_code == 200
    texts = [p["text"] for p in inputs.json()["predictions"]]
    assert len(texts) == 2 and all(len(t) == 6 for t in texts)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": 123}, "prompt must be a string"),
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": "h\u00e9llo\u20ac"}, "not in the vocabulary"),
        ({"prompt": "a", "max_new_tokens": -5}, "max_new_tokens must be between 1 and 2000"),
        ({"prompt": "a", "max_new_tokens": 10**6}, "max_new_tokens must be between 1 and 2000"),
        ({"prompt": "a", "temperature": 0}, "temperature must be > 0"),
        ({"prompt": "a", "top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"prompt": "a", "top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"max_new_tokens": 5}, "prompt"),
        ({"prompt": "a" * 1_000_000}, "prompt must be at most 10,000 characters, got 1,000,000"),
        ([{"prompt": "a", "max_new_tokens": 1}] * 20_000, "at most 64 rows, got 20000"),
        ([{"prompt": "a", "max_new_tokens": 2000}] * 17, "at most 32,000 tokens in all"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_bad_requests_get_400_and_the_server_keeps_serving(
    server: str, record: dict | list, message: str
) -> None:
    response = _post(server, {"dataframe_records": record if isinstance(record, list) else [record]})
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]
    assert _post(server, {"dataframe_records": [{"prompt": "a", "max_new_tokens": 2}]}).status_code == 200


def test_sixteen_clients_at_once_are_all_answered_as_if_alone(server: str) -> None:
    """A bounded load (loopback, 48 requests from 16 threads, then it stops): every request answered,
    seeded ones exactly as when sent alone, and the server still serving afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    def body(i: int) -> dict:
        rows = 16 if i % 3 == 0 else 1  # batch 16 and batch 1 requests mixed
        return {"dataframe_records": [{"prompt": "ROMEO:", "max_new_tokens": 40, "seed": i}] * rows}

    alone = {i: _post(server, body(i)).json()["predictions"] for i in range(6)}
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda i: _post(server, body(i % 6)), range(48)))
    assert [a.status_code for a in answers] == [200] * 48
    for i, answer in enumerate(answers):
        assert answer.json()["predictions"] == alone[i % 6]
    assert requests.get(f"{server}/ping", timeout=5).status_code == 200


def test_scores_agree_with_evaluate_the_command_and_the_server(
    repro_repo: tuple[Path, str], server: str, tmp_path: Path
) -> None:
    """One scoring function: the validation text scores as evaluate's stateful loss; the command and
    the served model's task=score give the same figures; Shakespeare beats its own shuffled letters."""
    import random

    import torch

    from lstm_textgen.data.dataset import load_dataset
    from lstm_textgen.devices import resolve_dtype
    from lstm_textgen.inference.scoring import score_text
    from lstm_textgen.model.checkpoint import load_model
    from lstm_textgen.params import load_params

    repo, _ = repro_repo
    loaded, params = load_model(repo / "data/model/model.pt"), load_params(repo / "params.yaml")
    dataset = load_dataset(repo / "data/prepared")
    dtype = resolve_dtype(params.train.dtype, torch.device("cpu"), params.model.cell)
    scored = score_text(
        loaded.model, loaded.vocab, loaded.vocab.decode(dataset.splits["val"]), params.evaluate, dtype
    )
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())["val"]
    assert scored.nats / scored.predicted == pytest.approx(evaluated["loss"], rel=1e-5)
    assert scored.bits_per_character == pytest.approx(evaluated["bits_per_character"], rel=1e-5)

    excerpt = loaded.vocab.decode(dataset.splits["train"][:3000])
    letters = list(excerpt)
    random.Random(0).shuffle(letters)
    shuffled = score_text(loaded.model, loaded.vocab, "".join(letters), params.evaluate, dtype)
    assert score_text(loaded.model, loaded.vocab, excerpt, params.evaluate, dtype).nats < shuffled.nats

    text = "ROMEO:\nWhat light through yonder window breaks?\n"
    (tmp_path / "romeo.txt").write_text(text)
    env = tool_env(repo) | {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    command = ["lstm-textgen", "score", "--model", f"models:/{MODEL_NAME}@champion", "--json", "--tokens"]
    figures = json.loads(run([*command, str(tmp_path / "romeo.txt")], cwd=repo, env=env).stdout)
    answer = _post(
        server, {"dataframe_records": [{"prompt": text}], "params": {"task": "score", "per_token": True}}
    )
    assert answer.status_code == 200, answer.text
    served = answer.json()["predictions"][0]
    for key in ("nats", "bits_per_character", "bits_per_token", "perplexity", "tokens", "predicted"):
        assert served[key] == pytest.approx(figures[key], rel=1e-6), key
    assert [token for token, _ in served["token_logprobs"]] == list(text[1:])
    assert figures["unknown"] == 0 and figures["predicted"] == len(text) - 1
    bad = _post(server, {"dataframe_records": [{"prompt": "naïve ☕"}], "params": {"task": "score"}})
    assert bad.status_code == 400 and "not in the vocabulary" in bad.json()["message"]


# --- the web demo and the plots page, in a real browser (Debian's chromium, driven by Playwright) ---

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
LOCAL = ("http://127.0.0.1", "ws://127.0.0.1", "file://", "data:", "blob:")


def require_browser() -> None:
    """Under CI a missing browser fails the test (`make test` installs it); elsewhere it skips."""
    if CHROMIUM.exists():
        return
    message = f"no browser at {CHROMIUM}: `make test` installs it (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def demo_page(repo: Path, log: Path) -> Iterator[tuple[object, list[str]]]:
    """`lstm-textgen demo` on a free port in `repo`, opened in headless Chromium with the network cut:
    every request that is not to the page's own server is refused and listed."""
    require_browser()
    from playwright.sync_api import sync_playwright

    port = free_port()
    command = ["lstm-textgen", "demo", "--port", str(port)]
    output = log.open("w")
    process = subprocess.Popen(command, cwd=repo, env=tool_env(repo), stdout=output, stderr=output)
    external: list[str] = []
    try:
        url = wait_for_page(process, f"http://127.0.0.1:{port}", log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.route("**/*", lambda route: offline(route, external))
            page.goto(url)
            page.wait_for_selector("#generate")
            yield page, external
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=20)
        output.close()


def offline(route, refused: list[str]) -> None:
    if route.request.url.startswith(LOCAL):
        route.continue_()
    else:
        refused.append(route.request.url)
        route.abort()


def wait_for_page(process: subprocess.Popen, url: str, log: Path) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the demo exited:\n{log.read_text()}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return url
        except requests.ConnectionError:
            time.sleep(0.5)
    raise AssertionError("the demo did not answer within 120 s")


def generate_in_page(page, prompt: str, length: int, seed: int) -> tuple[str, list[int]]:
    """Type the prompt, length and seed, press Generate; the final text and the lengths it had as it grew."""
    page.fill("#prompt textarea", prompt)
    page.fill("#length input[type=number]", str(length))
    page.press("#length input[type=number]", "Enter")
    page.fill("#seed input", str(seed))
    page.press("#seed input", "Tab")
    page.evaluate(
        """() => { const box = document.querySelector('#output textarea'); window.seen = [];
        window.watch = setInterval(() => { const n = box.value.length;
          if (window.seen.at(-1) !== n) window.seen.push(n); }, 5); }"""
    )
    page.click("#generate")
    page.wait_for_function("() => /tokens in/.test(document.querySelector('#generate-status').innerText)")
    seen = page.evaluate("() => { clearInterval(window.watch); return window.seen; }")
    return page.input_value("#output textarea"), seen


def register_large_untrained_version(store: Path, tmp_path: Path) -> int:
    """A second registered version, 2 x 1024 and untrained: switching to it changes the page's
    description and what is generated, and it generates slowly enough to be stopped midway."""
    import torch

    from lstm_textgen.model.checkpoint import load_checkpoint, save_checkpoint
    from lstm_textgen.model.recurrent import RecurrentLM
    from lstm_textgen.params import parse_params
    from lstm_textgen.tracking.registry import register

    checkpoint = load_checkpoint(store / "data/model/model.pt")
    checkpoint["params"]["model"].update(layers=2, hidden=1024)
    torch.manual_seed(0)
    shape = parse_params(checkpoint["params"]).model
    checkpoint["model"] = RecurrentLM(len(checkpoint["vocab"]["tokens"]), shape).state_dict()
    save_checkpoint(tmp_path / "large.pt", checkpoint)
    run_id = json.loads((store / "metrics/train.json").read_text())["mlflow_run_id"]
    tags = {"corpus": "shakespeare", "level": "char", "lowercase": "false", "val_bits_per_character": "6.25"}
    return register(tmp_path / "large.pt", run_id, MODEL_NAME, "ROMEO:", 99.0, tags).version


def pick_version(page, version: int) -> None:
    page.click("#picker input")
    page.get_by_role("option").filter(has_text=f"{MODEL_NAME} v{version} ").click()
    page.wait_for_function(f"() => document.querySelector('#picker input').value.includes(' v{version} ')")


def stop_midway(page, prompt: str) -> str:
    """Generate 2000 tokens, press Stop once the text has started: the text stops where it was."""
    page.fill("#prompt textarea", prompt)
    page.fill("#seed input", "-1")
    page.click("#generate")
    page.wait_for_function(
        "p => { const v = document.querySelector('#output textarea').value; "
        "return v.startsWith(p) && v.length > p.length; }",
        arg=prompt,
    )
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('#generate-status').innerText === 'stopped'")
    page.wait_for_timeout(1000)  # what was already on its way arrives
    stopped = page.input_value("#output textarea")
    page.wait_for_timeout(1000)
    assert page.input_value("#output textarea") == stopped, "the text still grows after Stop"
    assert page.inner_text("#generate-status") == "stopped"  # not "2,000 tokens in ...": it never finished
    return stopped


def test_demo_page_streams_scores_and_switches_models_offline(
    store: Path, server: str, tmp_path: Path
) -> None:
    import mlflow.pyfunc
    import pandas as pd

    large = register_large_untrained_version(store, tmp_path)
    champion = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    with demo_page(store, tmp_path / "demo.log") as (page, refused):
        assert "(champion)" in page.input_value("#picker input")  # the champion is shown first
        text, _ = generate_in_page(page, "ROMEO:", 2000, seed=7)
        served = champion.predict(pd.DataFrame({"prompt": ["ROMEO:"], "max_new_tokens": [2000], "seed": [7]}))
        assert text == "ROMEO:" + served["text"][0]  # the served model's generation code, streamed
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

        page.fill("#prompt textarea", "ROMEO: \u2603")
        page.click("#generate")
        page.wait_for_selector("#generate-status .error")
        answer = _post(server, {"dataframe_records": [{"prompt": "ROMEO: \u2603"}]})
        shown = page.inner_text("#generate-status")  # the server prefixes its own "Failed to predict"
        assert shown.startswith("Error: prompt has 1 token(s) not in the vocabulary: '\u2603'")
        assert shown.removeprefix("Error: ") in answer.json()["message"]

        page.get_by_role("tab", name="Score").click()
        excerpt = "ROMEO:\nBut soft, what light through yonder window breaks?"
        page.fill("#score-text textarea", excerpt)
        page.click("#score")
        page.wait_for_selector("#surprisal-text span")
        scored = champion.predict(pd.DataFrame({"prompt": [excerpt]}), params={"task": "score"})
        shown = page.inner_text("#bits-per-character")
        assert shown == f"{scored['bits_per_character'][0]:.3f} bits per character"
        spans = page.eval_on_selector_all(
            "#surprisal-text span", "s => s.map(e => [e.textContent, e.dataset.bits])"
        )
        assert "".join(piece for piece, _ in spans) == excerpt  # every character, each coloured
        assert spans[0][1] == "" and len({bits for _, bits in spans[1:]}) > 10
        page.screenshot(path=str(tmp_path / "score.png"), full_page=True)

        page.get_by_role("tab", name="Generate").click()
        pick_version(page, large)
        page.wait_for_function("() => document.querySelector('#about').innerText.includes('LSTM 2×1024')")
        # the large model draws a token in milliseconds, not microseconds: the text is seen growing
        switched, seen = generate_in_page(page, "ROMEO:", 400, seed=7)
        assert switched.startswith("ROMEO:") and switched != text[: len(switched)]
        growing = [n for n in seen[1:] if len("ROMEO:") < n < len(switched)]  # [0]: before the click
        assert len(growing) >= 3 and growing == sorted(growing), seen  # it grew in the page, in steps
        assert len(stop_midway(page, "JULIET:")) < len("JULIET:") + 2000
        assert refused == []  # nothing but the page's own server was asked for anything
    keep_screenshots(tmp_path / "demo.png", tmp_path / "score.png")


def keep_screenshots(*shots: Path) -> None:
    """`make screenshots` sets LSTM_TEXTGEN_SCREENSHOTS: the README's pictures come from this test."""
    folder = os.environ.get("LSTM_TEXTGEN_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, Path(folder) / shot.name)


def test_ui_link_lands_on_the_runs_table(store: Path, tmp_path: Path) -> None:
    """MLflow 3 rewrites a plain experiment link to its GenAI overview; the printed link must stay on
    the runs table, with the pipeline's run listed."""
    require_browser()
    from playwright.sync_api import sync_playwright

    port, log = free_port(), tmp_path / "ui.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            ["lstm-textgen", "ui", "--port", str(port)],
            cwd=store,
            env=tool_env(store),
            stdout=output,
            stderr=output,
        )
    try:
        wait_for_page(process, f"http://127.0.0.1:{port}", log)
        link = log.read_text().split("ui: the runs table: ")[1].split()[0]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(link)
            page.wait_for_selector("text=Run Name", timeout=60_000)
            page.wait_for_timeout(1500)  # a redirect to the GenAI pages would have happened by now
            url, body = page.url, page.inner_text("body")
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert "/runs" in url and "genai" not in url.lower(), url
    assert "Traces" not in body.split("Run Name")[0] or "workflowType=machine_learning" in url


def test_plots_page_draws_its_charts_offline(store: Path) -> None:
    run(["lstm-textgen", "plots"], cwd=store)
    index = store / "dvc_plots/index.html"
    assert "cdn.jsdelivr" not in index.read_text()
    require_browser()
    from playwright.sync_api import sync_playwright

    refused: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page()
        page.route("**/*", lambda route: offline(route, refused))
        page.goto(index.as_uri())
        page.wait_for_selector("svg.marks")
        lines = page.eval_on_selector_all("svg.marks path", "paths => paths.length")
        titles = page.eval_on_selector_all("svg.marks text", "texts => texts.map(t => t.textContent)")
        browser.close()
    assert lines > 10 and "Loss per step" in titles and "val_loss" in titles
    assert refused == []

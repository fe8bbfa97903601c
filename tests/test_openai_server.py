"""`lstm-textgen serve` as applications use it: a real server process on the pipeline's registered
champion, called by the official `openai` client (plain and streaming, n, seed, stop, echo,
logprobs, its error types), its texts compared with `mlflow models serve`'s for the same rows, API
keys, a full batch, a client that goes away, /metrics parsed as Prometheus reads it, schemathesis
fuzzing from its OpenAPI schema, and the demo page it mounts with `--demo`, in Chromium."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import (
    CHROMIUM,
    free_port,
    model_server,
    offline,
    require_browser,
    tool_env,
    wait_for,
    wait_for_page,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

MODEL = "lstm-textgen-shakespeare-char"
KEY = "test-key-0123456789"
PLACES = 4  # LSTM_TEXTGEN_ACTIVE_ROWS, no waiting places: a request of n=4 fills the server


@pytest.fixture(scope="module")
def serve(repro_repo: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store, _ = repro_repo
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    env = tool_env(store) | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
        "LSTM_TEXTGEN_API_KEYS": KEY,
        "LSTM_TEXTGEN_ACTIVE_ROWS": str(PLACES),
        "LSTM_TEXTGEN_WAITING_ROWS": "1",
    }
    command = ["lstm-textgen", "serve", f"models:/{MODEL}@champion", "--port", str(port), "--demo"]
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=store, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_page(process, f"{url}/health", log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_served(repro_repo: tuple[Path, str]) -> Iterator[str]:
    store, _ = repro_repo
    with model_server(store, f"models:/{MODEL}@champion") as url:
        yield url


def client(url: str, key: str = KEY, retries: int = 0):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=retries)


def streamed(url: str, **request: object) -> tuple[dict[int, str], dict[int, str]]:
    """Each choice's text joined from the stream, and its finish reason."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for part in client(url).completions.create(model=MODEL, stream=True, **request):
        for choice in part.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons


def test_models_health_and_the_key(serve: str) -> None:
    [card] = client(serve).models.list().data
    assert card.id == MODEL
    extra = card.model_dump()
    assert extra["corpus"] == "shakespeare" and extra["level"] == "char" and extra["version"]
    assert requests.get(f"{serve}/health", timeout=10).json() == {"status": "ok"}
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError) as refused:
        client(serve, key="wrong-key-000000").completions.create(model=MODEL, prompt="ROMEO:", max_tokens=4)
    assert refused.value.body["code"] == "invalid_api_key"  # type: ignore[index]


def test_plain_and_streamed_texts_agree_with_n_seeds_and_usage(serve: str) -> None:
    request = {"prompt": "ROMEO:", "max_tokens": 40, "seed": 7, "n": 3, "temperature": 0.9}
    answer = client(serve).completions.create(model=MODEL, **request)
    texts = {c.index: c.text for c in answer.choices}
    assert sorted(texts) == [0, 1, 2] and all(len(t) == 40 for t in texts.values())
    assert len(set(texts.values())) == 3  # three seeds: 7, 8, 9
    assert {c.finish_reason for c in answer.choices} == {"length"}
    assert answer.usage.completion_tokens == 120 and answer.usage.prompt_tokens == len("ROMEO:")
    joined, reasons = streamed(serve, **request)
    assert joined == texts and set(reasons.values()) == {"length"}
    second = client(serve).completions.create(model=MODEL, **{**request, "seed": 8, "n": 1})
    assert second.choices[0].text == texts[1]  # choice i is seeded with seed + i


def test_stop_echo_and_logprobs(serve: str) -> None:
    base = {"prompt": "ROMEO:", "max_tokens": 200, "seed": 3, "temperature": 1.0}
    full = client(serve).completions.create(model=MODEL, **base).choices[0].text
    stop = full[20:22]
    cut = client(serve).completions.create(model=MODEL, stop=[stop, "\x00never"], **base).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    joined, reasons = streamed(serve, stop=[stop], **base)
    assert joined == {0: cut.text} and reasons == {0: "stop"}
    echoed = client(serve).completions.create(model=MODEL, echo=True, **{**base, "max_tokens": 10})
    assert echoed.choices[0].text == "ROMEO:" + full[:10]
    scored = client(serve).completions.create(model=MODEL, logprobs=3, **{**base, "max_tokens": 10})
    logprobs = scored.choices[0].logprobs
    assert "".join(logprobs.tokens) == full[:10] and len(logprobs.token_logprobs) == 10
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 3 and chosen <= max(top.values()) + 1e-6 and chosen < 0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31),
    temperature=st.floats(0.3, 1.5),
    top_k=st.sampled_from([None, 1, 5, 40]),
    top_p=st.sampled_from([None, 0.5, 0.9]),
    prompt=st.sampled_from(["ROMEO:", "To be, or not", "\n"]),
)
def test_streamed_equals_plain_equals_mlflow_models_serve(
    serve: str,
    mlflow_served: str,
    seed: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    prompt: str,
) -> None:
    settings_ = {"seed": seed, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    extra = {"top_k": top_k} if top_k is not None else {}
    openai_settings = {"prompt": prompt, "max_tokens": 30, "seed": seed, "temperature": temperature}
    if top_p is not None:
        openai_settings["top_p"] = top_p
    plain = client(serve).completions.create(model=MODEL, extra_body=extra, **openai_settings).choices[0].text
    joined, _ = streamed(serve, extra_body=extra, **openai_settings)
    row = {"prompt": prompt, "max_new_tokens": 30, "strategy": "sample"}
    row |= {k: v for k, v in settings_.items() if v is not None}
    answer = requests.post(f"{mlflow_served}/invocations", json={"dataframe_records": [row]}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert joined == {0: plain} and plain == answer.json()["predictions"][0]["text"]


def test_errors_come_in_openai_shapes(serve: str) -> None:
    from openai import BadRequestError, NotFoundError

    with pytest.raises(BadRequestError) as bad:
        client(serve).completions.create(
            model=MODEL, prompt="ROMEO:", max_tokens=4, extra_body={"top_k": 10**6}
        )
    assert bad.value.body["param"] == "top_k"  # type: ignore[index]
    with pytest.raises(BadRequestError) as bad:
        client(serve).completions.create(model=MODEL, prompt="ROMEO:", max_tokens=10**6)
    assert bad.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(BadRequestError) as bad:
        client(serve).completions.create(model=MODEL, prompt="ROMEO: \u2603", max_tokens=4)
    assert "not in the vocabulary" in bad.value.body["message"]  # type: ignore[index]
    with pytest.raises(NotFoundError):
        client(serve).completions.create(model="gpt-4", prompt="ROMEO:", max_tokens=4)
    answer = requests.post(f"{serve}/v1/completions", data=b"{not json", headers=auth(), timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def metric(url: str, name: str, **labels: str) -> float:
    """A sample of /metrics, read with Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0  # a counter of labels not seen yet


def outcome(url: str, retries: int, max_tokens: int = 2000) -> tuple[int, str | None]:
    """One completion through the openai client: its status and Retry-After."""
    from openai import InternalServerError

    try:
        client(url, retries=retries).completions.create(model=MODEL, prompt="ROMEO:", max_tokens=max_tokens)
    except InternalServerError as exc:
        return exc.status_code, exc.response.headers.get("retry-after")
    return 200, None


def test_a_full_server_answers_503_with_retry_after_and_the_client_retries(serve: str) -> None:
    """5 places (4 stepping, 1 waiting): of 16 long requests at once some are refused at once with 503
    and Retry-After, the others answered; a client that retries gets every answer in the end."""
    refused = metric(serve, "lstm_textgen_rejected_requests_total", reason="overloaded")
    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(lambda _: outcome(serve, retries=0), range(16)))
    assert (200, None) in outcomes and (503, "1") in outcomes and set(outcomes) == {(200, None), (503, "1")}
    refused_once = metric(serve, "lstm_textgen_rejected_requests_total", reason="overloaded")
    assert refused_once - refused == outcomes.count((503, "1"))
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda _: outcome(serve, retries=10, max_tokens=1000), range(8)))
    assert outcomes == [(200, None)] * 8
    assert metric(serve, "lstm_textgen_rejected_requests_total", reason="overloaded") > refused_once


def test_a_client_that_goes_away_frees_its_rows(serve: str) -> None:
    generated = metric(serve, "lstm_textgen_generation_tokens_total")
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 2000, "n": PLACES, "stream": True}
    with requests.post(
        f"{serve}/v1/completions", json=body, headers=auth(), stream=True, timeout=60
    ) as answer:
        assert answer.status_code == 200
        next(line for line in answer.iter_lines() if line.startswith(b"data: "))  # generating
    wait_for(lambda: metric(serve, "lstm_textgen_num_requests_running") == 0, "the rows to leave", timeout=30)
    assert metric(serve, "lstm_textgen_generation_tokens_total") - generated < PLACES * 2000
    assert metric(serve, "lstm_textgen_time_to_first_token_seconds_count") >= 1


def test_score_agrees_with_the_served_model(serve: str, mlflow_served: str) -> None:
    text = "To be, or not to be, that is the question"
    ours = requests.post(
        f"{serve}/v1/score", json={"model": MODEL, "input": [text]}, headers=auth(), timeout=60
    )
    theirs = requests.post(
        f"{mlflow_served}/invocations",
        json={"dataframe_records": [{"prompt": text}], "params": {"task": "score"}},
        timeout=60,
    )
    assert ours.status_code == 200 and theirs.status_code == 200, (ours.text, theirs.text)
    [figures] = ours.json()["data"]
    served = theirs.json()["predictions"][0]
    assert figures["bits_per_character"] == pytest.approx(served["bits_per_character"], rel=1e-6)


def test_fuzzed_requests_get_no_5xx_but_503_and_answers_match_the_schema(serve: str) -> None:
    """Schemathesis, from the server's own OpenAPI schema, valid and invalid requests to every
    endpoint: whatever a request holds, no 500, and every answer is one the schema documents (status,
    content type, body shape); 503 only with `Retry-After`. A body's `model` names the served one, so
    that the fuzzing reaches past the model check."""
    import schemathesis
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{serve}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions",
        "POST /v1/score",
        "GET /v1/models",
        "GET /health",
        "GET /metrics",
    }
    documented = [content_type_conformance, response_schema_conformance, status_code_conformance]
    tried: dict[int, int] = {}

    def check(case) -> None:
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL
        response = case.call(headers=auth(), timeout=120)
        tried[response.status_code] = tried.get(response.status_code, 0) + 1
        overloaded = response.status_code == 503 and response.headers.get("Retry-After")
        checks = documented if overloaded else [not_a_server_error, *documented]
        case.validate_response(response, checks=checks)

    budget = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    valid, invalid = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
    for operation in operations:
        modes = [valid, invalid] if operation.method == "post" else [valid]  # a GET has no input to spoil
        for mode in modes:
            budget(given(case=operation.as_strategy(generation_mode=mode))(check))()
    assert tried.get(200, 0) > 0 and tried.get(400, 0) > 0, tried  # past the checks, and refused


def test_the_demo_page_it_mounts_logs_in_with_a_key_and_draws_the_apis_text(serve: str) -> None:
    """`serve --demo`: the demo's page at /demo/, behind the API keys (a key is the password), generating
    in the API's batcher: the same seed gives the page the API's text."""
    require_browser()
    from playwright.sync_api import sync_playwright
    from test_demo import PAGE_TIMEOUT_MS, generate_in_page

    api = client(serve).completions.create(model=MODEL, prompt="ROMEO:", max_tokens=60, seed=11)
    assert requests.get(f"{serve}/demo/config", timeout=10).status_code == 401
    external: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.route("**/*", lambda route: offline(route, external))
        login = f"{serve}/demo/login"
        assert page.request.post(login, form={"username": "u", "password": "wrong-key-000"}).status == 400
        assert page.request.post(login, form={"username": "u", "password": KEY}).ok
        page.goto(f"{serve}/demo/")
        page.wait_for_selector("#generate")
        text, _ = generate_in_page(page, "ROMEO:", 60, 11)
        browser.close()
    assert text == "ROMEO:" + api.choices[0].text
    assert not external  # the page needs nothing from outside the machine

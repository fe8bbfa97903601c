"""Registration in the MLflow Model Registry and serving with the real `mlflow models serve`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import model_server, run, tool_env

pytestmark = pytest.mark.slow
MODEL_NAME = "lstm-textgen-shakespeare-char"


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


def test_champion_moves_only_on_improvement(store: Path, scratch_run: str) -> None:
    from mlflow.tracking import MlflowClient

    from lstm_textgen.tracking.registry import register

    run_id = scratch_run
    client = MlflowClient()
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    old_loss = float(champion.tags["val_loss"])
    tags = {"corpus": "shakespeare", "level": "char", "lowercase": "false"}
    checkpoint = store / "data/model/model.pt"

    equal = register(
        checkpoint, run_id, MODEL_NAME, example_prompt="ROMEO:", val_loss=old_loss + 4e-7, version_tags=tags
    )  # ties do not move it
    assert not equal.promoted and "does not beat it" in equal.reason
    worse = register(
        checkpoint, run_id, MODEL_NAME, example_prompt="ROMEO:", val_loss=old_loss + 0.5, version_tags=tags
    )
    assert not worse.promoted and "does not beat it" in worse.reason
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == champion.version

    other_corpus = register(
        checkpoint,
        run_id,
        MODEL_NAME,
        example_prompt="ROMEO:",
        val_loss=old_loss - 1.0,
        version_tags={**tags, "corpus": "anna"},
    )
    assert not other_corpus.promoted and "another corpus" in other_corpus.reason

    better = register(
        checkpoint, run_id, MODEL_NAME, example_prompt="ROMEO:", val_loss=old_loss - 0.5, version_tags=tags
    )
    # later versions, not consecutive ones: other workers' tests register into this shared store too
    assert better.promoted and better.version > other_corpus.version > worse.version > equal.version
    assert int(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == better.version
    version = client.get_model_version(MODEL_NAME, str(better.version))
    assert float(version.tags["val_loss"]) == pytest.approx(old_loss - 0.5, abs=1e-5)


def test_registered_model_follows_the_sample_params_and_carries_no_optimizer(
    store: Path, scratch_run: str
) -> None:
    """The register stage hands today's sample.* params to the model it logs: its defaults and its
    unknown-token policy; the logged checkpoint holds weights, vocabulary and params only."""
    import io

    import mlflow.pyfunc
    import pandas as pd
    import torch
    from mlflow.exceptions import MlflowException

    from lstm_textgen.params import SampleParams
    from lstm_textgen.tracking.registry import register

    run_id = scratch_run
    tags = {"corpus": "shakespeare", "level": "char", "lowercase": "false"}
    checkpoint = store / "data/model/model.pt"
    as_trained = register(
        checkpoint, run_id, MODEL_NAME, example_prompt="ROMEO:", val_loss=10.0, version_tags=tags
    )  # worse: not champion
    lenient = SampleParams(unknown="skip", temperature=0.5, top_k=7)
    changed = register(
        checkpoint,
        run_id,
        MODEL_NAME,
        example_prompt="ROMEO:",
        val_loss=10.0,
        version_tags=tags,
        sample=lenient,
    )
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
    """JSON as JavaScript writes it (NaN and Infinity allowed: a client may send them)."""
    headers = {"Content-Type": "application/json"}
    return requests.post(f"{url}/invocations", data=json.dumps(body), headers=headers, timeout=60)


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


FORMS_ROWS = [{"prompt": "ROMEO:", "seed": 1}, {"prompt": "JULIET:", "seed": 2}]


def test_every_input_form_gives_the_same_rows_and_texts(server: str, store: Path) -> None:
    """Each form MLflow documents for a column signature, in-process and over HTTP: the same texts."""
    import mlflow.pyfunc
    import pandas as pd

    params = {"max_new_tokens": 12}
    columns = {name: [row[name] for row in FORMS_ROWS] for name in ("prompt", "seed")}
    over_http = [
        {"dataframe_split": {"columns": ["prompt", "seed"], "data": [list(r.values()) for r in FORMS_ROWS]}},
        {"dataframe_records": FORMS_ROWS},
        {"inputs": columns},
        {"inputs": FORMS_ROWS},
    ]
    texts = []
    for body in over_http:
        answer = _post(server, {**body, "params": params})
        assert answer.status_code == 200, (body, answer.text)
        texts.append([p["text"] for p in answer.json()["predictions"]])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    for form in (pd.DataFrame(FORMS_ROWS), columns, FORMS_ROWS):
        texts.append(list(model.predict(form, params=params)["text"]))
    assert all(t == texts[0] for t in texts) and len(set(texts[0])) == 2, texts
    # one key holding a list (each row with the params' seed), and a dict of scalars (one row)
    one_key = list(model.predict({"prompt": columns["prompt"]}, params={**params, "seed": 1})["text"])
    assert one_key[0] == texts[0][0] and len(one_key) == 2
    assert list(model.predict(FORMS_ROWS[1], params=params)["text"]) == [texts[0][1]]
    single = _post(server, {"inputs": {"prompt": "JULIET:", "seed": 2}, "params": params})
    assert [p["text"] for p in single.json()["predictions"]] == [texts[0][1]]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": 123}, "prompt must be a string"),
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": "h\u00e9llo\u20ac"}, "not in the vocabulary"),
        ({"prompt": "a", "max_new_tokens": -5}, "max_new_tokens must be between 1 and 2000"),
        ({"prompt": "a", "max_new_tokens": 10**6}, "max_new_tokens must be between 1 and 2000"),
        ({"prompt": "a", "temperature": 0}, "temperature must be between 0.001 and 100"),
        ({"prompt": "a", "temperature": 1e-30}, "temperature must be between 0.001 and 100, got 1e-30"),
        ({"prompt": "a", "strategy": "mode", "draws": 10**9}, "draws must be between 1 and 1000"),
        ({"prompt": "a", "top_k": 2**70}, "top_k must be at most the vocabulary size"),
        ({"prompt": "a", "seed": 2**64}, "seed must be between 0 and 9223372036854775807"),
        ({"prompt": "a", "max_new_tokens": float("inf")}, "max_new_tokens must be an integer, got inf"),
        ({"prompt": "a", "temperature": "hot"}, "temperature must be a finite number, got 'hot'"),
        ({"prompt": "ROMEO: \ud83d"}, "surrogates not allowed"),
        (
            [{"prompt": "a", "strategy": "mode", "draws": 1000, "max_new_tokens": 200}] * 13,
            "at most 2,560,000 tokens read or drawn",
        ),
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


def test_rows_setting_different_optional_columns_are_answered_row_by_row(server: str) -> None:
    """A row that leaves a column out gets its default; a row that sets it, its own value."""
    rows = [
        {"prompt": "ROMEO:", "max_new_tokens": 20, "top_k": 5, "seed": 1},
        {"prompt": "JULIET:", "seed": 2},
        {"prompt": "KING:", "max_new_tokens": 9, "temperature": 1, "top_p": 0.9, "seed": 3},
    ]
    mixed = _post(server, {"dataframe_records": rows})
    assert mixed.status_code == 200, mixed.text
    alone = [_post(server, {"dataframe_records": [row]}).json()["predictions"][0] for row in rows]
    assert mixed.json()["predictions"] == alone
    assert [len(a["text"]) for a in alone] == [20, 200, 9]  # 200: the served model's default length


def test_overload_gets_503_with_retry_after_and_the_server_keeps_serving(
    repro_repo: tuple[Path, str],
) -> None:
    """Two places (one row stepping, one waiting): of 16 long requests at once, those that find no
    place are refused at once with 503, Retry-After and the reason; the others are answered."""
    from concurrent.futures import ThreadPoolExecutor

    store, _ = repro_repo
    small = {"LSTM_TEXTGEN_ACTIVE_ROWS": "1", "LSTM_TEXTGEN_WAITING_ROWS": "1"}
    with model_server(store, f"models:/{MODEL_NAME}@champion", small) as url:
        body = {"dataframe_records": [{"prompt": "ROMEO:", "max_new_tokens": 2000, "seed": 1}]}
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda _: _post(url, body), range(16)))
        refused = [a for a in answers if a.status_code == 503]
        answered = [a for a in answers if a.status_code == 200]
        assert refused and answered and len(refused) + len(answered) == 16
        for answer in refused:
            assert answer.headers["Retry-After"] == "1"
            assert "the server is busy" in answer.json()["message"]
        assert len({a.json()["predictions"][0]["text"] for a in answered}) == 1  # seeded: each as alone
        assert _post(url, body).status_code == 200


def test_scores_agree_with_evaluate_the_command_and_the_server(
    repro_repo: tuple[Path, str], server: str, tmp_path: Path
) -> None:
    """One scoring function: the validation text scores as evaluate's stateful loss (both read in
    float32, whatever the training dtype); the command and the served model's task=score give the
    same figures; Shakespeare beats its own shuffled letters."""
    import random

    import torch

    from lstm_textgen.data.dataset import load_dataset
    from lstm_textgen.inference.scoring import score_text
    from lstm_textgen.model.checkpoint import load_model
    from lstm_textgen.params import load_params

    repo, _ = repro_repo
    loaded, params = load_model(repo / "data/model/model.pt"), load_params(repo / "params.yaml")
    dataset = load_dataset(repo / "data/prepared")
    dtype = torch.float32
    scored = score_text(
        loaded.model,
        loaded.vocab,
        loaded.vocab.decode(dataset.splits["val"]),
        windows=params.evaluate,
        dtype=dtype,
    )
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())["val"]
    assert scored.nats / scored.predicted == pytest.approx(evaluated["loss"], rel=1e-5)
    assert scored.bits_per_character == pytest.approx(evaluated["bits_per_character"], rel=1e-5)

    excerpt = loaded.vocab.decode(dataset.splits["train"][:3000])
    letters = list(excerpt)
    random.Random(0).shuffle(letters)
    shuffled = score_text(loaded.model, loaded.vocab, "".join(letters), windows=params.evaluate, dtype=dtype)
    assert (
        score_text(loaded.model, loaded.vocab, excerpt, windows=params.evaluate, dtype=dtype).nats
        < shuffled.nats
    )

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

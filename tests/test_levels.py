"""Byte and BPE levels through the whole pipeline as a user runs them (`dvc exp run -S data.level=...`)
to a registered, served model; bits per character comparable across levels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from conftest import model_server, run, tiny_repo, tool_env, tracking_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_repo(tmp_path_factory.mktemp("levels") / "repo")


def experiment(repo: Path, *settings: str) -> dict:
    """Run one experiment; its evaluate metrics and prepare statistics."""
    overrides = [arg for setting in settings for arg in ("-S", setting)]
    run(["dvc", "exp", "run", *overrides], cwd=repo, env=tool_env(repo))
    return {
        "evaluate": json.loads((repo / "metrics/evaluate.json").read_text()),
        "prepare": json.loads((repo / "metrics/prepare.json").read_text()),
    }


def test_byte_and_bpe_levels_train_evaluate_register_and_serve(repo: Path) -> None:
    byte = experiment(repo, "data.level=byte")
    bpe = experiment(repo, "data.level=bpe", "data.vocab_size=512")
    assert byte["prepare"]["vocab_size"] == 256 and bpe["prepare"]["vocab_size"] == 512
    # BPE tokens hold several characters; bits per character put both on one scale
    assert bpe["prepare"]["characters_per_token"] > 1.5 and 0.9 < byte["prepare"]["characters_per_token"] <= 1
    for metrics, prepared in ((byte, byte["prepare"]), (bpe, bpe["prepare"])):
        val = metrics["evaluate"]["val"]
        per_token = prepared["characters_per_token"]
        assert val["bits_per_character"] == pytest.approx(val["bits_per_token"] / per_token, rel=0.02)
        assert 0 < val["bits_per_character"] < 8
    assert (repo / "data/prepared/vocab.json").is_file()
    saved = json.loads((repo / "data/prepared/vocab.json").read_text())
    assert saved["level"] == "bpe" and saved["tokenizer"]["model"]["type"] == "BPE"

    prompt = "Café ☕ 𝄞 — ROMEO:"  # characters the Shakespeare text never has: no unknowns at these levels
    with model_server(repo, "models:/lstm-textgen-shakespeare-bpe@champion") as url:
        body = {"dataframe_records": [{"prompt": prompt, "max_new_tokens": 60, "seed": 1}]}
        answer = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    text = answer.json()["predictions"][0]["text"]
    # whatever bytes were drawn, the answer is the model's text with broken UTF-8 as U+FFFD: the same
    # as the registered model gives in-process, and valid Unicode (no lone surrogates)
    import mlflow
    import pandas as pd

    with tracking_store(repo):
        local = mlflow.pyfunc.load_model("models:/lstm-textgen-shakespeare-bpe@champion")
    request = pd.DataFrame(body["dataframe_records"])
    assert text and text == local.predict(request)["text"][0]
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)

    sampled = run(
        ["lstm-textgen", "sample", "--prompt", prompt, "--length", "40", "--seed", "3"],
        cwd=repo,
        env=tool_env(repo),
    )
    assert sampled.stdout.startswith(prompt)

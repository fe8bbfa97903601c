"""The served model's code without a server: models registered before the package had folders still
load, in a fresh process (with the code they shipped) and beside today's package (the demo and
`lstm-textgen score` load models into a process that has already imported it)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "model-before-folders.tar.gz"
# greedy: the same text from the old code and today's (seeded sampling draws its numbers differently
# since generation has per-row random streams)
REQUEST = pd.DataFrame({"prompt": ["ROMEO:"], "max_new_tokens": [12], "strategy": ["greedy"]})


@pytest.fixture
def old_model(tmp_path: Path) -> Path:
    """A tiny char model saved by the package as of 25c17f6 (its code under code/lstm_textgen)."""
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(tmp_path, filter="data")
    return tmp_path / "model"


def test_a_model_registered_before_the_folders_loads_beside_todays_package(old_model: Path) -> None:
    import mlflow

    import lstm_textgen.serving.model  # noqa: F401  (today's package, imported first)

    text = mlflow.pyfunc.load_model(str(old_model)).predict(REQUEST)["text"][0]
    assert len(text) == 12  # the continuation: twelve characters of a char model


def test_a_model_registered_before_the_folders_loads_in_a_fresh_process(old_model: Path) -> None:
    script = (
        "import sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "request = pd.DataFrame({'prompt': ['ROMEO:'], 'max_new_tokens': [12], 'strategy': ['greedy']})\n"
        "print(model.predict(request)['text'][0])\n"
    )
    fresh = subprocess.run([sys.executable, "-c", script, str(old_model)], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    import mlflow

    import lstm_textgen.serving.model  # noqa: F401

    beside = mlflow.pyfunc.load_model(str(old_model)).predict(REQUEST)["text"][0]
    assert fresh.stdout.rstrip("\n") == beside  # the old code and today's give the same text


def test_serving_options_come_from_the_environment_and_bad_ones_are_named() -> None:
    from lstm_textgen.errors import UserError
    from lstm_textgen.serving.limits import ServingOptions

    default = ServingOptions.from_environment({})
    assert default.batching and (default.limits.active_rows, default.limits.waiting_rows) == (64, 256)
    chosen = ServingOptions.from_environment(
        {
            "LSTM_TEXTGEN_BATCHING": "off",
            "LSTM_TEXTGEN_ACTIVE_ROWS": "8",
            "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "5",
        }
    )
    assert not chosen.batching and chosen.limits.active_rows == 8 and chosen.request_seconds == 5.0
    for name, value in (("LSTM_TEXTGEN_ACTIVE_ROWS", "many"), ("LSTM_TEXTGEN_WAITING_ROWS", "-1")):
        with pytest.raises(UserError, match=f"{name} must be a positive int, got '{value}'"):
            ServingOptions.from_environment({name: value})
    with pytest.raises(UserError, match="LSTM_TEXTGEN_BATCHING must be on or off"):
        ServingOptions.from_environment({"LSTM_TEXTGEN_BATCHING": "maybe"})

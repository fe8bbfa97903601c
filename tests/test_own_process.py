"""The registered model in a user's own process: 12 short scripts (each way of calling it, once) that
load it and predict all end cleanly (exit 0, no abort at interpreter exit), and docs/notebook.ipynb,
executed cell by cell in a real Jupyter kernel (nbclient) on the pipeline's store, twice (the kernel
shut down and a fresh one started), draws the served model's texts for the same rows and seeds."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tool_env, tracking_store

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).parents[1] / "docs" / "notebook.ipynb"
MODEL = "lstm-textgen-shakespeare-char"


def executed(notebook, store: Path):
    from nbclient import NotebookClient

    run = copy.deepcopy(notebook)
    client = NotebookClient(
        run, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(store / "docs")}}
    )
    client.execute(env=tool_env(store))  # its own kernel, shut down at the end
    return run


def printed(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def test_the_notebook_runs_twice_in_a_real_kernel_and_draws_the_served_texts(
    repro_repo: tuple[Path, str],
) -> None:
    import mlflow
    import nbformat
    import pandas as pd

    store, _ = repro_repo
    (store / "docs").mkdir(exist_ok=True)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    first, second = executed(notebook, store), executed(notebook, store)
    code = [cell for cell in first.cells if cell.cell_type == "code"]
    assert all(out.output_type != "error" for cell in code for out in cell.outputs)
    generating = next(i for i, cell in enumerate(code) if "settings = [" in cell.source)
    texts = json.loads(printed(code[generating]).strip().splitlines()[-1])
    again = [cell for cell in second.cells if cell.cell_type == "code"]
    assert json.loads(printed(again[generating]).strip().splitlines()[-1]) == texts  # a fresh kernel
    plotted = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(plotted) == 1  # the surprisal bars
    table = code[-1].outputs[-1]["data"]["text/plain"]
    assert "bits per character" in table

    rows = pd.DataFrame(
        [
            {"prompt": "ROMEO:", "max_new_tokens": 120, "temperature": 0.5, "seed": 1},
            {"prompt": "ROMEO:", "max_new_tokens": 120, "temperature": 1.0, "seed": 1},
            {"prompt": "ROMEO:", "max_new_tokens": 120, "temperature": 1.0, "top_k": 5, "seed": 2},
        ]
    )
    with tracking_store(store):
        served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(rows)
    assert texts == list(served["text"])


SCRIPT = """
import sys
import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
row = {"prompt": "ROMEO:", "max_new_tokens": 40, "seed": int(sys.argv[2])}
data = pd.DataFrame([row]) if sys.argv[3] == "frame" else row
params = {"task": "score"} if sys.argv[4] == "score" else None
print(model.predict(data, params=params).iloc[0].to_dict())
if sys.argv[5] == "close":  # done with it before the end: the batcher's thread ends now
    model.unwrap_python_model().close()
"""


def test_scripts_that_load_the_model_and_predict_in_every_way_all_end_cleanly(
    repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    """A daemon batcher thread that had run torch code and still waited as the interpreter finalised
    aborted such scripts now and then (`terminate called without an active exception`, exit 134).
    Twelve scripts: each pairing of input form (frame, dict), task (generate twice, score) and end
    (close, exit) once; ten more processes exit after generating in test_batcher.py."""
    import mlflow

    store, _ = repro_repo
    registered = json.loads((store / "metrics" / "register.json").read_text())
    with tracking_store(store):  # the model's files, once: each script then loads it as a user's would
        model = mlflow.artifacts.download_artifacts(registered["model_uri"], dst_path=str(tmp_path))
    env = tool_env(store)
    ways = itertools.product(("frame", "dict"), ("generate", "generate", "score"), ("close", "exit"))
    for i, (shape, task, end) in enumerate(ways):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, model, str(i), shape, task, end],
            cwd=store,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (i, shape, task, end, done.returncode, done.stderr[-2000:])
        assert "terminate called" not in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert ("bits_per_character" if task == "score" else "text") in done.stdout

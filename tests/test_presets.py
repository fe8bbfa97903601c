"""The notebook presets: docs/presets.md prints each one's command, and every preset runs to completion
as a user runs it (`dvc exp run --temp` with the preset's settings), its corpus served over loopback
HTTP, in a repo copy of its own: apart from test_experiments.py so that the two slow modules can run
on separate pytest-xdist workers."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import run, runs_by_name, tiny_repo, tool_env

from lstm_textgen.apps.presets import command, load_presets

PRESETS_FILE = Path(__file__).parents[1] / "presets.yaml"
SHARED_FILES = {
    "tinyshakespeare": "tinyshakespeare.txt",
    "wonderland": "wonderland.txt",
    "anna": "anna.txt",
    "reddit-cleanjokes": "reddit-cleanjokes.csv",
    "ag_news": "ag_news_test.csv",
}
TINY_BUDGET = ["-S", "train.max_steps=2", "-S", "train.eval_every=1", "-S", "train.eval_batches=1"]
TINY_BUDGET += ["-S", "sample.length=12"]
# the evaluation reads whole splits with the preset's own model (a 2 x 512 LSTM for Anna): small
# splits keep it to seconds, and every stage still runs
TINY_BUDGET += ["-S", "data.val_fraction=0.005", "-S", "data.test_fraction=0.005"]


def test_documented_preset_commands_match_presets_yaml() -> None:
    readme = (PRESETS_FILE.parent / "docs" / "presets.md").read_text()
    presets = load_presets(PRESETS_FILE)
    for name in presets:
        expected = shlex.join(command(name, presets, ["--temp"])).replace("|", "\\|")
        assert f"`{expected}`" in readme, name


@pytest.fixture(scope="module")
def preset_runs(
    tmp_path_factory: pytest.TempPathFactory, corpus_server: str
) -> tuple[Path, dict[str, subprocess.CompletedProcess[str]]]:
    repo = tiny_repo(tmp_path_factory.mktemp("presets") / "repo")
    env = tool_env(repo)
    presets = load_presets(repo / "presets.yaml")
    outputs = {}
    for name, settings in self_contained(presets).items():
        corpus = settings.get("data.corpus", "shakespeare")
        source = []
        if corpus in SHARED_FILES:  # served over loopback HTTP instead of the real URL
            source = ["-S", f"corpora.{corpus}.source={corpus_server}/files/{SHARED_FILES[corpus]}"]
        outputs[name] = run(command(name, presets, ["--temp", *source, *TINY_BUDGET]), repo, env, check=False)
    return repo, outputs


# Sized for a CUDA GPU (minutes of CPU per step of evaluation): test_bench.py's gpu-check test trains it,
# made small, on the CPU.
GPU_PRESETS = {"gpu-shakespeare"}


def self_contained(presets: dict[str, dict]) -> dict[str, dict]:
    """The CPU presets that need nothing in the store: a fine-tuning one needs its source model, and
    is run by test_finetune.py on a model trained there."""
    return {
        name: settings
        for name, settings in presets.items()
        if "train.init_from" not in settings and name not in GPU_PRESETS
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(self_contained(load_presets(PRESETS_FILE))))
def test_every_preset_runs_to_completion(preset_runs, name: str) -> None:
    repo, outputs = preset_runs
    result = outputs[name]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logged = runs_by_name(repo)[name]
    assert logged.info.status == "FINISHED"
    assert "eval.val.loss" in logged.data.metrics
    settings = load_presets(PRESETS_FILE)[name]
    assert logged.data.tags["corpus"] == settings.get("data.corpus", "shakespeare")
    for key in ("model.layers", "model.hidden", "model.input", "train.objective"):
        if key in settings:
            assert logged.data.params[key] == str(settings[key]), key


@pytest.mark.slow
def test_compare_table_lists_every_preset_run(preset_runs, tmp_path: Path) -> None:
    repo, _ = preset_runs
    env = {**tool_env(repo), "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    out = tmp_path / "runs.md"
    run(["lstm-textgen", "compare", "--markdown", str(out)], cwd=tmp_path, env=env)
    table = out.read_text()
    for name, settings in self_contained(load_presets(PRESETS_FILE)).items():
        row = next((line for line in table.splitlines() if f"| {name} |" in line), None)
        assert row is not None, name
        assert f"| {settings.get('data.corpus', 'shakespeare')} |" in row, row

"""The README's commands work exactly as printed, from a fresh shell whose PATH lacks the venv."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, runs_by_name, tiny_repo

pytestmark = pytest.mark.slow
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def shell_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[line.split("  #")[0].strip() for line in b.splitlines() if line.strip()] for b in blocks]


def fresh_shell(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """bash with a bare PATH, as a new terminal on a machine where nothing is activated."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    assert str(REPO_ROOT / ".venv") not in env["PATH"]
    return subprocess.run(
        ["bash", "-c", "set -e\n" + script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tiny_repo(tmp_path_factory.mktemp("readme") / "repo")
    (repo / ".venv").symlink_to(REPO_ROOT / ".venv")  # the venv `make` created, as on the user's clone
    return repo


def test_the_experiment_commands_run_as_printed(repo: Path) -> None:
    commands = shell_blocks(section("Experiments"))[0]
    assert commands[:2] == ["source .venv/bin/activate", "dvc exp run -S model.layers=4"]
    result = fresh_shell("\n".join(commands[:2]), repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert yaml.safe_load((repo / "params.yaml").read_text())["model"]["layers"] == 4
    metrics = json.loads((repo / "metrics/train.json").read_text())
    run = next(r for r in runs_by_name(repo).values() if r.info.run_id == metrics["mlflow_run_id"])
    assert run.data.params["model.layers"] == "4" and run.info.status == "FINISHED"


def test_make_exp_runs_without_activating(repo: Path) -> None:
    printed = 'make exp ARGS="-S model.layers=4"'
    assert printed in README
    result = fresh_shell(printed.replace("layers=4", "layers=2"), repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert yaml.safe_load((repo / "params.yaml").read_text())["model"]["layers"] == 2
    assert json.loads((repo / "metrics/train.json").read_text())["steps"] > 0


def test_the_sampling_and_scoring_commands_run_as_printed(repo: Path) -> None:
    if not (repo / "data/model/model.pt").is_file():  # run alone: the experiment test trains it first
        assert fresh_shell(".venv/bin/dvc repro", repo).returncode == 0
    commands = shell_blocks(section("Evaluation, sampling, scoring"))[0]
    assert [c.split()[1] if c.startswith(".venv") else c.split("|")[1].split()[1] for c in commands] == [
        "sample",
        "sample",
        "score",
    ]
    result = fresh_shell("\n".join(commands), repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.startswith("ROMEO:") and "bits per character " in result.stdout

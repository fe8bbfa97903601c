"""The layers of docs/code.md are kept by import-linter's contracts (pyproject.toml): the package as it
is keeps them, and one import against them breaks the build, naming the import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"]
    env = {"PYTHONPATH": f"{root / 'src'}:{root}", "PATH": "/usr/bin:/bin"}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)


def test_the_package_keeps_its_layers() -> None:
    done = lint_imports(REPO_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "broken"),
    [
        ("data/fetch.py", "from lstm_textgen.apps import cli", "layers"),  # a low layer reaching up
        ("model/stepper.py", "from lstm_textgen.inference import batcher", "layers"),
        ("model/checkpoint.py", "from lstm_textgen.model import stepper", None),  # allowed: no circle
        ("model/recurrent.py", "from lstm_textgen.model import stepper", "no circle"),  # a circle
    ],
)
def test_an_import_against_the_layers_fails_naming_it(
    tmp_path: Path, module: str, wrong_import: str, broken: str | None
) -> None:
    for part in ("src", "stages"):
        shutil.copytree(REPO_ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / "src" / "lstm_textgen" / module
    path.write_text(path.read_text() + f"\n{wrong_import}  # noqa\n")
    done = lint_imports(tmp_path)
    if broken is None:
        assert done.returncode == 0, done.stdout[-3000:]
        return
    assert done.returncode != 0
    assert f"{broken}" in done.stdout and "BROKEN" in done.stdout
    importer = "lstm_textgen." + module.removesuffix(".py").replace("/", ".")
    assert importer in done.stdout or importer.rsplit(".", 1)[1] in done.stdout, done.stdout[-3000:]

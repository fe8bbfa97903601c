"""dvc.yaml's code deps follow the code: each stage lists every module of the package it runs (its
imports, direct or not, lazy ones included, and the served model's entry for `register`), and nothing
it does not run. Without this, a fix to decoding or generation leaves metrics, samples and the
registered model built from the old code, silently."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lstm_textgen.apps.code_deps import (
    declared_code,
    differences,
    import_closure,
    shortest_deps,
    stage_scripts,
    update,
)

REPO = Path(__file__).resolve().parents[1]
DVC_YAML, SRC = REPO / "dvc.yaml", REPO / "src"
PACKAGE = SRC / "lstm_textgen"

# An edited file and the stages `dvc repro` re-runs for it: exactly those whose command runs its code.
RERUN_BY_EDIT = {
    "inference/generation.py": {"init", "sample", "register"},  # the served model generates with it
    "data/tokenisers.py": {"init", "prepare", "train", "evaluate", "sample", "register"},
    "inference/scoring.py": {"init", "register"},  # the served model's task=score
    "model/checkpoint.py": {"init", "train", "evaluate", "sample", "register"},
    "model/recurrent.py": {"init", "train", "evaluate", "sample", "register"},
    "train/loop.py": {"train"},  # not prepare
    "apps/demo.py": set(),  # the web page, the plots command and the benchmarks re-run nothing
    "apps/plots.py": set(),
}


def test_every_stage_lists_exactly_the_code_it_runs() -> None:
    problems = differences(DVC_YAML, SRC)
    assert not problems, "\n".join(problems) + "\n(fix: `lstm-textgen code-deps` rewrites dvc.yaml)"


@pytest.mark.parametrize("edited", sorted(RERUN_BY_EDIT))
def test_an_edit_reruns_the_stages_that_run_it(edited: str) -> None:
    declared = declared_code(DVC_YAML)
    rerun = {stage for stage, files in declared.items() if PACKAGE / edited in files}
    assert rerun == RERUN_BY_EDIT[edited]


def test_no_stage_runs_the_benchmarks_or_the_apps() -> None:
    for stage, files in declared_code(DVC_YAML).items():
        assert not any(REPO / "benchmarks" in f.parents or PACKAGE / "apps" in f.parents for f in files), (
            stage
        )


def test_the_closure_sees_lazy_imports_and_skips_type_checking_ones(tmp_path: Path) -> None:
    package = tmp_path / "src" / "lstm_textgen"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text('"""docstring only: runs nothing"""\n')
    (package / "sub" / "__init__.py").write_text("VALUE = 1\n")  # runs code: counts
    (package / "sub" / "lazy.py").write_text("")
    (package / "sub" / "typed.py").write_text("")
    (package / "direct.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lstm_textgen.sub import typed\n"
        "def later():\n    from .sub import lazy\n"
    )
    script = tmp_path / "stages" / "stage.py"
    script.parent.mkdir()
    script.write_text("import os\nfrom lstm_textgen import direct\n")
    found = {p.relative_to(tmp_path).as_posix() for p in import_closure(script, tmp_path / "src")}
    assert found == {
        "stages/stage.py",
        "src/lstm_textgen/direct.py",
        "src/lstm_textgen/sub/__init__.py",
        "src/lstm_textgen/sub/lazy.py",
    }
    closure = import_closure(script, tmp_path / "src")
    assert shortest_deps(closure, package) == [
        package / "direct.py",
        package / "sub" / "__init__.py",
        package / "sub" / "lazy.py",
    ]


def test_a_missing_or_extra_file_is_named_and_rewritten(tmp_path: Path) -> None:
    assert set(stage_scripts(DVC_YAML)) == {
        "download",
        "init",
        "prepare",
        "train",
        "evaluate",
        "sample",
        "register",
    }
    for folder in ("src", "stages"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    text = DVC_YAML.read_text()
    broken = text.replace("      - src/lstm_textgen/inference/generation.py\n", "", 1)
    broken = broken.replace(
        "      - stages/download.py\n", "      - stages/download.py\n      - src/lstm_textgen/apps\n"
    )
    (tmp_path / "dvc.yaml").write_text(broken)
    problems = "\n".join(differences(tmp_path / "dvc.yaml", tmp_path / "src"))
    assert (
        "stage sample: runs src/lstm_textgen/inference/generation.py but dvc.yaml does not list it"
        in problems
    )
    assert "stage download: lists src/lstm_textgen/apps/demo.py but never runs it" in problems

    assert update(tmp_path / "dvc.yaml", tmp_path / "src", check=True) == 1
    assert update(tmp_path / "dvc.yaml", tmp_path / "src") == 0  # rewrites the lists, keeps the rest
    assert (tmp_path / "dvc.yaml").read_text() == text

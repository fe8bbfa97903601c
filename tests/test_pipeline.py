"""`dvc repro` end to end in a temporary copy of the repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import copy_repo, run

pytestmark = pytest.mark.slow


def test_dvc_repro_download_and_prepare_then_nothing(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    first = run(["dvc", "repro", "prepare"], cwd=repo)
    assert "Running stage 'download'" in first.stdout and "Running stage 'prepare'" in first.stdout
    stats = json.loads((repo / "data/prepared/stats.json").read_text())
    assert stats["corpus"]["name"] == "shakespeare" and stats["vocab_size"] > 60
    assert (repo / "data/prepared/train.npy").stat().st_size > 4_000_000
    second = run(["dvc", "repro", "prepare"], cwd=repo)
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout

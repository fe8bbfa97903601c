"""Smoke run of the benchmark's every code path with tiny budgets (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, tool_env

pytestmark = pytest.mark.slow


def test_benchmark_quick_run_writes_a_report(corpora_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "--quick",
            "--corpus",
            str(corpora_dir / "tinyshakespeare.txt"),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=tool_env(),
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    for row in ("prepare: seconds", "training: useful predictions per second", "generation, batch 64"):
        assert row in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["training"]["ours"]["median"] > 0 and results["training"]["notebook"]["median"] > 0
    assert len(results["quality"]["curve"]) >= 2
    mfu = results["training"]["mfu"]
    assert 0 < mfu["mfu"] < 1 and mfu["peak_flops"] > mfu["achieved_flops"] > 0
    assert "Model FLOP utilisation" in report
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"

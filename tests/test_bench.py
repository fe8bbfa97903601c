"""Smoke run of the benchmark's every code path with tiny budgets (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run, tool_env

pytestmark = pytest.mark.slow


def bench_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=tool_env())


def test_benchmark_quick_run_writes_a_report(corpora_dir: Path, tmp_path: Path) -> None:
    corpus = str(corpora_dir / "tinyshakespeare.txt")
    bench_module("benchmarks.bench", "--quick", "--corpus", corpus, "--out", str(tmp_path))
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


def test_gpu_check_runs_every_check_on_the_cpu_and_says_no_gpu_figures(
    corpora_dir: Path, tmp_path: Path
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: `make gpu-check` measures it for real")
    bench_module(
        "benchmarks.gpu_check", "--corpus", str(corpora_dir / "tinyshakespeare.txt"), "--out", str(tmp_path)
    )
    report = (tmp_path / "report.md").read_text()
    assert "no GPU figures are measured yet" in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["gpu"] is None
    assert results["ddp"]["backend"] == "gloo" and results["ddp"]["max_weight_difference"] == 0
    assert results["resume"]["max_weight_difference"] == 0  # bit for bit on the CPU
    assert results["generation"]["same_text"] is True
    assert results["cpu_serving"]["generated_characters"] == 40


def test_ddp_benchmark_trains_on_one_and_two_processes(tmp_path: Path) -> None:
    bench_module("benchmarks.bench_ddp", "--steps", "4", "--out", str(tmp_path))
    runs = json.loads((tmp_path / "ddp.json").read_text())["runs"]
    assert [(r["processes"], r["global_batch"]) for r in runs] == [(1, 16), (2, 16), (2, 32)]
    assert all(r["tokens_per_sec"] > 0 for r in runs)
    assert "| 2 | 8 | 16 |" in (tmp_path / "ddp.md").read_text()

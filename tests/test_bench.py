"""Smoke run of the benchmark's every code path with tiny budgets (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO_ROOT, run, tool_env


def bench_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=tool_env())


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert "no GPU figures are measured yet" in report and "failed" not in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["gpu"] is None and set(results["seconds"]) == {
        "precision",
        "throughput",
        "target",
        "ddp",
        "resume",
        "generation",
        "cpu_serving",
    }
    # Which autocast kernels exist depends on the CPU kind (AVX2 only, AVX512-BF16, AMX): assert
    # that the report says, for each, whether it ran, and that a float16 step that ran is scaled.
    precision = results["precision"]
    assert set(precision) == {"lstm_bfloat16", "lstm_float16", "gru_bfloat16", "gru_float16"}
    for key, fact in precision.items():
        if fact["ran"]:
            assert fact["loss_scaled"] is ("float16" in (key.split("_")[1], fact["recurrent_dtype"]))
        else:
            assert fact["error"]
    assert results["ddp"]["backend"] == "gloo" and results["ddp"]["max_weight_difference"] == 0
    resume = results["resume"]  # bit for bit on the CPU, dropout or not
    assert resume["max_weight_difference"] == 0 and resume["max_weight_difference_with_dropout"] == 0
    generation = results["generation"]
    assert generation["same_text"] is True and generation["logits_within_tolerance"] is True
    assert results["cpu_serving"]["generated_characters"] == 40


def test_gpu_check_saves_after_every_check_and_goes_on_after_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from benchmarks import gpu_check

    def boom() -> dict:
        raise RuntimeError("CUDA error: device-side assert triggered")

    fake = [("first", lambda: {"x": 1}), ("second", boom), ("third", lambda: {"y": 2})]
    monkeypatch.setattr(gpu_check, "checks", lambda args, workdir, results: iter(fake))
    saved: list[list[str]] = []
    results = gpu_check.check_all(
        SimpleNamespace(corpus="c"),
        Path("."),
        lambda r: saved.append([k for k in ("first", "second", "third") if k in r]),
    )
    assert saved == [["first"], ["first", "second"], ["first", "second", "third"]]
    assert "device-side assert" in results["second"]["error"] and results["third"] == {"y": 2}
    shown = gpu_check.report({**results, "gpu": "test", "throughput": results["second"]})
    assert (
        "| training, default params / `gpu-shakespeare`, after a warm-up | **failed**: RuntimeError" in shown
    )


@pytest.mark.slow
def test_ddp_benchmark_trains_on_one_and_two_processes(tmp_path: Path) -> None:
    bench_module("benchmarks.bench_ddp", "--steps", "4", "--out", str(tmp_path))
    runs = json.loads((tmp_path / "ddp.json").read_text())["runs"]
    assert [(r["processes"], r["global_batch"]) for r in runs] == [(1, 16), (2, 16), (2, 32)]
    assert all(r["tokens_per_sec"] > 0 for r in runs)
    assert "| 2 | 8 | 16 |" in (tmp_path / "ddp.md").read_text()

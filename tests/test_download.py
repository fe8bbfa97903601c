"""Downloads against a real HTTP server on 127.0.0.1: success, checksum, HTTP errors, truncation, timeouts."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, edit_params, tool_env

from lstm_textgen.data.fetch import DownloadError, fetch

TINY_SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FAST = {"timeout_s": 5.0, "retries": 1, "backoff_s": 0.01}  # generous: tests share the cores


def _nothing_left(directory: Path) -> bool:
    return not directory.exists() or not any(directory.iterdir())


def test_download_with_checksum(corpus_server: str, corpora_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "tiny.txt"
    digest = fetch(f"{corpus_server}/files/tinyshakespeare.txt", dest, sha256=TINY_SHA, **FAST)
    assert digest == TINY_SHA
    assert dest.read_bytes() == (corpora_dir / "tinyshakespeare.txt").read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["tiny.txt"]


def test_checksum_mismatch_names_both_hashes_and_leaves_nothing(corpus_server: str, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "tiny.txt"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        fetch(
            f"{corpus_server}/files/tinyshakespeare.txt", dest, sha256=wrong, key="corpora.t.sha256", **FAST
        )
    assert f"expected sha256 {wrong}, got {TINY_SHA}" in str(info.value)
    assert "corpora.t.sha256" in str(info.value)
    assert _nothing_left(dest.parent)


def test_http_404_fails_at_once(corpus_server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{corpus_server}/files/missing.txt", tmp_path / "x.txt", retries=3, backoff_s=5)
    assert _nothing_left(tmp_path)


def test_server_closing_mid_transfer(corpus_server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="mid-transfer") as info:
        fetch(f"{corpus_server}/truncate/wonderland.txt", tmp_path / "x.txt", **FAST)
    assert "gave up after 2 attempts" in str(info.value)
    assert _nothing_left(tmp_path)


def test_slow_server_hits_the_timeout(corpus_server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"within 0.5 s \(download.timeout_s\)"):
        fetch(f"{corpus_server}/slow/wonderland.txt", tmp_path / "x.txt", timeout_s=0.5, retries=0)
    assert _nothing_left(tmp_path)


def test_transient_503_is_retried(corpus_server: str, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "x.txt"
    fetch(f"{corpus_server}/flaky/wonderland.txt", dest, **FAST)
    assert dest.stat().st_size == 167518
    assert "HTTP 503" in capsys.readouterr().out


def test_size_cap(corpus_server: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="size cap"):
        fetch(f"{corpus_server}/files/anna.txt", tmp_path / "x.txt", max_bytes=1000, **FAST)
    assert _nothing_left(tmp_path)


def test_unreachable_host(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"cannot reach 127\.0\.0\.1:9"):
        fetch("http://127.0.0.1:9/x.txt", tmp_path / "x.txt", retries=0)
    assert _nothing_left(tmp_path)


def test_local_path_and_file_url(corpora_dir: Path, tmp_path: Path) -> None:
    source = corpora_dir / "wonderland.txt"
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    assert fetch(str(source), tmp_path / "a") == expected
    assert fetch(source.as_uri(), tmp_path / "b", sha256=expected) == expected
    with pytest.raises(DownloadError, match="file not found"):
        fetch(str(tmp_path / "nope.txt"), tmp_path / "c")


def _run_download_stage(tmp_path: Path, corpus: str, spec: dict) -> subprocess.CompletedProcess[str]:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["corpora"][corpus] = spec  # replaced whole, not merged into the table's entry
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    edit_params(tmp_path / "params.yaml", data={"corpus": corpus}, download={"timeout_s": 2, "retries": 0})
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "download.py"), "--out", str(tmp_path / "raw")],
        cwd=tmp_path,
        env=tool_env(),
        capture_output=True,
        text=True,
    )


def test_download_stage_over_http(corpus_server: str, tmp_path: Path) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    spec = dict(params["corpora"]["wonderland"], source=f"{corpus_server}/files/wonderland.txt")
    result = _run_download_stage(tmp_path, "wonderland", spec)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "raw" / "corpus.txt").read_text(encoding="utf-8")
    assert text.startswith("ALICE'S ADVENTURES IN WONDERLAND")
    summary = json.loads((tmp_path / "raw" / "corpus.json").read_text())
    assert summary["source_sha256"] == spec["sha256"]


def test_download_stage_checksum_mismatch_exits_nonzero(corpus_server: str, tmp_path: Path) -> None:
    spec = {"source": f"{corpus_server}/files/wonderland.txt", "sha256": "1" * 64}
    result = _run_download_stage(tmp_path, "alice", spec)
    assert result.returncode == 2
    assert "checksum mismatch" in result.stderr and "corpora.alice.sha256" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "raw" / "corpus.txt").exists()
    assert not any((tmp_path / "raw").glob("*")) if (tmp_path / "raw").exists() else True

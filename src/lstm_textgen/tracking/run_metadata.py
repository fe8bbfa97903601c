"""What a run records about where it comes from: MLflow's source tags (script, commit, remote: the UI's
Source column), the corpus and device tags, its name (the DVC experiment's) and its description (the
command that reproduces it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lstm_textgen.tracking.store import repository_root


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=repository_root(), capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def source_tags() -> dict[str, str]:
    """MLflow's own tags for where a run comes from, which its UI shows in the Source column: the
    script (relative to the repository), the commit and, where the clone has one, its remote."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    root = repository_root()
    name = str(script.relative_to(root)) if script and script.is_relative_to(root) else str(script or "")
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": name or "lstm-textgen",
        "mlflow.source.git.commit": _git("rev-parse", "HEAD"),
        "mlflow.source.git.repoURL": _git("remote", "get-url", "origin"),
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def run_tags(corpus: dict[str, Any], device: str) -> dict[str, str]:
    source = source_tags()
    tags = {
        **source,
        "git_commit": source.get("mlflow.source.git.commit"),  # the name earlier runs were tagged with
        "dvc_experiment": os.environ.get("DVC_EXP_NAME"),
        "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"),
        "corpus": corpus.get("name"),
        "corpus_source": corpus.get("source"),
        "corpus_sha256": corpus.get("source_sha256"),
        "corpus_text_sha256": corpus.get("text_sha256"),
        "device": device,
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def run_name() -> str | None:
    """Named after the DVC experiment when there is one; MLflow picks a name otherwise."""
    return os.environ.get("DVC_EXP_NAME") or None


def run_description() -> str:
    """What reproduces this run, shown as the run's description in the MLflow UI."""
    commit = _git("rev-parse", "--short", "HEAD") or "the current commit"
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        return (
            f"DVC experiment `{experiment}` (baseline {commit}). "
            f"Reproduce: `dvc exp apply {experiment} && dvc repro`."
        )
    return f"Pipeline run at {commit}. Reproduce: `git checkout {commit} && dvc repro`."

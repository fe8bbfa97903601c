"""MLflow tracking: the only place that knows where the store is.

The store is a SQLite database `mlflow.db` at the repository root with artifacts under `mlruns/`.
Its location comes from MLFLOW_TRACKING_URI if set, else DVC's DVC_ROOT (a queued `dvc exp run`
works in a temporary copy that is deleted afterwards, while DVC_ROOT names the real repository), else
the nearest directory above the working directory that holds `.dvc` or `.git`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lstm_textgen.cli import shutting_down

EXPERIMENT_NAME = "lstm-textgen"
# MLflow 3's UI opens an experiment of this kind on its runs, not on the GenAI overview
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def repository_root() -> Path:
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repository_root() / 'mlflow.db'}"


def artifact_root() -> str:
    return (repository_root() / "mlruns").as_uri()


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT_NAME)


def configure() -> Any:
    """Point MLflow at the store and make sure the experiment exists (absolute artifact location)."""
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    name = experiment_name()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        mlflow.create_experiment(name, artifact_location=artifact_root(), tags=EXPERIMENT_KIND)
    elif not EXPERIMENT_KIND.items() <= experiment.tags.items():
        for key, value in EXPERIMENT_KIND.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    mlflow.set_experiment(name)
    return mlflow


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=repository_root(), capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def run_tags(corpus: dict[str, Any], device: str) -> dict[str, str]:
    tags = {
        "git_commit": _git("rev-parse", "HEAD"),
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


@contextmanager
def active_run(run_id: str | None = None, **start_kwargs: Any) -> Iterator[Any]:
    """Start (or reopen, by id) a run; an exception marks it FAILED with the error as a tag and says
    where to look."""
    mlflow = configure()
    with mlflow.start_run(run_id=run_id, **start_kwargs) as run:
        try:
            yield run
        except BaseException as exc:
            shutting_down()
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.end_run(status="FAILED")
            print(
                f"MLflow run {run.info.run_id} is marked FAILED with the error as its 'error' tag; "
                "look at it with `make ui` (experiment lstm-textgen, status Failed)",
                file=sys.stderr,
            )
            raise

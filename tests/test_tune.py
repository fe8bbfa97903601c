"""`lstm-textgen tune` on a tiny corpus and a tiny space, as a user runs it: two workers share one
study with every trial unique and nested under the study's MLflow run; a learning rate far too small is
pruned before its budget; the best trial becomes a DVC experiment and a registered version; a worker
killed outright leaves a failed trial and a new `tune` goes on with the study; bad `tune` settings are
refused with the key named before any training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import edit_params, prepared_tiny_repo, run, runs_by_name, tiny_repo, tool_env, wait_for

pytestmark = pytest.mark.slow

TUNE = [sys.executable, "-m", "lstm_textgen.apps.cli", "tune"]
TRIAL = {"trial_minutes": None, "trial_steps": 40, "startup_trials": 1, "heartbeat_seconds": 2}


def tune_repo(repro_repo: tuple[Path, str], dest: Path, space: dict, **tune: object) -> Path:
    """A tiny repo, prepared, whose `tune` section is TRIAL with `tune` merged in and `space` as the
    whole search space (params.yaml's own is replaced, not merged)."""
    repo = prepared_tiny_repo(
        repro_repo, dest, train={"eval_every": 10, "eval_batches": 2, "threads": 1}, tune={**TRIAL, **tune}
    )
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["tune"]["space"] = space
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return repo


def study(repo: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{repo / 'optuna.db'}")


def trial_runs(repo: Path) -> list:
    return [r for r in runs_by_name(repo / "mlflow.db").values() if "tune.trial" in r.data.tags]


def test_two_workers_share_one_study_with_unique_trials(repro_repo: tuple[Path, str], tmp_path: Path) -> None:
    space = {"model.hidden": {"choices": [16, 24, 32]}, "train.lr": {"low": 0.003, "high": 0.03, "log": True}}
    repo = tune_repo(
        repro_repo,
        tmp_path / "repo",
        space,
        study="pair",
        trials=4,
        workers=2,
        sampler="random",
        experiment=False,
    )
    done = run([*TUNE], cwd=repo)
    assert "Study pair" in done.stdout
    trials = study(repo, "pair").trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert trials[0].params == {"model.hidden": 32, "train.lr": pytest.approx(6.5e-3)}  # params.yaml's
    runs = trial_runs(repo)
    assert sorted(r.data.tags["tune.trial"] for r in runs) == ["0", "1", "2", "3"]
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    parent = next(r for r in runs_by_name(repo / "mlflow.db").values() if r.info.run_id in parents)
    assert parent.data.tags["tune.role"] == "study" and parent.info.status == "FINISHED"  # ended with tune
    # (which worker took which trial depends on the load: one may take them all while the other starts)
    shown = run([*TUNE, "show"], cwd=repo)
    assert "dvc exp run -S model.hidden=" in shown.stdout
    assert (repo / "data" / "tune" / "pair" / "history.png").stat().st_size > 0


def test_a_hopeless_learning_rate_is_pruned_and_the_best_becomes_an_experiment(
    repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    repo = tune_repo(
        repro_repo,
        tmp_path / "repo",
        {"train.lr": {"low": 1e-6, "high": 0.05, "log": True}},
        study="prune",
        trials=2,
    )
    import optuna

    first = optuna.create_study(storage=f"sqlite:///{repo / 'optuna.db'}", study_name="prune")
    first.enqueue_trial({"train.lr": 0.01})  # a good rate, then one far too small
    first.enqueue_trial({"train.lr": 0.000001})
    run([*TUNE], cwd=repo)
    trials = {t.number: t for t in study(repo, "prune").trials}
    assert trials[0].params["train.lr"] == 0.01 and trials[0].state.name == "COMPLETE"
    assert trials[1].params["train.lr"] == 0.000001 and trials[1].state.name == "PRUNED"
    assert max(trials[1].intermediate_values) < 40  # stopped before its budget
    runs = {r.data.tags["tune.trial"]: r for r in trial_runs(repo)}
    assert runs["1"].data.tags["tune.state"] == "PRUNED" and runs["1"].info.status == "FINISHED"
    assert runs["0"].data.tags["tune.state"] == "COMPLETE"
    assert "tune-prune-0" in run(["dvc", "exp", "list", "--name-only"], cwd=repo).stdout.split()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    versions = client.search_model_versions("name='lstm-textgen-shakespeare-char'")
    assert versions  # the experiment registered a version


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_a_killed_worker_fails_its_trial_and_the_study_goes_on(
    repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    space = {"model.hidden": {"choices": [16, 32]}}
    repo = tune_repo(
        repro_repo,
        tmp_path / "repo",
        space,
        study="killed",
        trials=2,
        experiment=False,
        trial_steps=100_000,
        trial_minutes=0.3,
    )
    main = subprocess.Popen(
        [*TUNE], cwd=repo, env=tool_env(repo), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for(lambda: trials_running(repo, "killed"), "a running trial", process=main, pause=0.5)
    time.sleep(2)
    for pid in children(main.pid):
        os.kill(pid, signal.SIGKILL)
    main.communicate(timeout=60)
    assert [t.state.name for t in study(repo, "killed").trials] == ["RUNNING"]
    time.sleep(5)  # past the heartbeat's grace period (2 x 2 s)
    run([*TUNE], cwd=repo)
    states = [t.state.name for t in study(repo, "killed").trials]
    assert states[0] == "FAIL" and states.count("COMPLETE") >= 1


def trial_runs_once_running(repo: Path, name: str) -> list:
    """The trials' MLflow runs, read only once a trial runs (the store exists by then: reading it
    earlier would race the `tune` process on its schema)."""
    if not any(t.state.name == "RUNNING" for t in study_or_none(repo, name)):
        return []
    try:
        return trial_runs(repo)
    except Exception:  # no store yet
        return []


def trials_running(repo: Path, name: str) -> bool:
    return any(t.state.name == "RUNNING" for t in study_or_none(repo, name))


def study_or_none(repo: Path, name: str) -> list:
    try:
        return study(repo, name).trials
    except Exception:
        return []


@pytest.mark.parametrize(
    ("tune", "named"),
    [
        ({"space": {"model.hiden": {"choices": [16]}}}, "did you mean model.hidden"),
        ({"space": {"train.lr": {"low": 0.1, "high": 0.01}}}, "must be below high"),
        ({"sampler": "bayes"}, "tune.sampler"),
    ],
)
def test_bad_tune_settings_are_refused_before_any_training(tmp_path: Path, tune: dict, named: str) -> None:
    repo = tiny_repo(tmp_path / "repo")
    edit_params(repo / "params.yaml", tune=tune)
    done = run([*TUNE], cwd=repo, check=False)
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (repo / "optuna.db").exists()


def test_sigterm_ends_the_trial_as_killed_and_the_worker_cleanly(
    repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    space = {"model.hidden": {"choices": [16, 32]}}
    repo = tune_repo(
        repro_repo, tmp_path / "repo", space, study="stopped", trials=1, experiment=False, trial_steps=100_000
    )
    main = subprocess.Popen(
        [*TUNE], cwd=repo, env=tool_env(repo), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    # the trial's run is open: training started
    wait_for(lambda: trial_runs_once_running(repo, "stopped"), "the trial's run", 180, main, pause=0.5)
    time.sleep(2)
    for pid in children(main.pid):
        os.kill(pid, signal.SIGTERM)
    _, err = main.communicate(timeout=120)
    [trial] = study(repo, "stopped").trials
    assert trial.state.name == "FAIL" and "Terminated" in trial.user_attrs["stopped"]
    [killed] = trial_runs(repo)
    assert killed.info.status == "KILLED"
    assert b"Traceback" not in err


@pytest.mark.parametrize(
    ("params", "named"),
    [
        (
            {},
            "(data/prepared/vocab.json, data/raw/corpus.json missing): run `dvc repro prepare` first",
        ),
        ({"train": {"processes": 2}}, "train.processes: 2: a trial trains inside its worker"),
        (
            {"tune": {"space": {"train.init_from": {"choices": ["a.pt"]}}}},
            "train.init_from cannot be searched",
        ),
    ],
)
def test_what_no_trial_could_run_is_refused_before_any_worker_starts(
    tmp_path: Path, params: dict, named: str
) -> None:
    """Nothing prepared (after `dvc exp run`s that left data/ empty), or a key a trial cannot honour:
    one line naming the fix, exit 2, no study and no worker."""
    repo = tiny_repo(tmp_path / "repo")
    if params:
        edit_params(repo / "params.yaml", **params)
    done = run([*TUNE, "--workers", "2"], cwd=repo, check=False)
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "worker(s)" not in done.stdout
    assert not (repo / "optuna.db").exists()


def test_a_study_whose_every_trial_fails_exits_non_zero_naming_why(
    repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    """Every trial fails (here its folder cannot be made: a file stands where it goes): `tune` exits
    non-zero with the first failure's reason in one line, and the study's MLflow run ends FAILED."""
    repo = tune_repo(
        repro_repo, tmp_path / "repo", {"model.hidden": {"choices": [16, 24]}}, study="doomed", trials=2
    )
    (repo / "data" / "tune").mkdir(parents=True)
    (repo / "data" / "tune" / "doomed").write_text("not a folder")
    done = run([*TUNE], cwd=repo, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    reason = next(line for line in done.stderr.splitlines() if "no trial completed" in line)
    assert "2 failed; the first, trial 0: cannot write" in reason and "Not a directory" in reason, reason
    assert "Traceback" not in done.stderr
    parent = next(
        r for r in runs_by_name(repo / "mlflow.db").values() if r.data.tags.get("tune.role") == "study"
    )
    assert parent.info.status == "FAILED"
    assert "dvc exp run" not in done.stdout.split("best:")[-1]  # no experiment of a failed study

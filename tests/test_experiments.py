"""Experiments as a user runs them: the README's commands exactly as printed from a fresh shell
(`dvc exp run -S`, `make exp`, sampling and scoring), queued sweeps, a failing experiment, the compare
table and the MLflow UI's REST API, in a temporary repo copy (the notebook presets: test_presets.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml
from conftest import (
    REPO_ROOT,
    copy_of_repro_repo,
    free_port,
    page_ok,
    run,
    runs_by_name,
    store_client,
    tool_env,
    wait_for,
)

from lstm_textgen.tracking.store import SERVER_DEFAULTS

pytestmark = pytest.mark.slow


@dataclass
class Experiments:
    repo: Path
    env: dict[str, str]
    outputs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    readme_run_id: str = ""  # the MLflow run of the README's `dvc exp run -S model.layers=4`

    def client(self):
        return store_client(self.repo)

    def runs(self) -> dict[str, object]:
        return runs_by_name(self.repo)


# queued and run two at a time: a two-process experiment beside one that diverges
SUCCEEDING = ("processes2",)
QUEUED = (*SUCCEEDING, "sidefail")
FAILING = ["-n", "sidefail", "-S", "train.lr=10", "-S", "train.grad_clip=0", "-S", "train.warmup_steps=0"]
FAILING += ["-S", "train.schedule=constant"]


def run_queue(repo: Path, env: dict[str, str], jobs: int) -> subprocess.CompletedProcess[str]:
    """`dvc queue start -j N`, then wait until the queue is empty; the workers' logs as stdout."""
    run(["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, env=env)
    status = ""

    def queue_empty() -> bool:
        nonlocal status
        status = run(["dvc", "queue", "status"], cwd=repo, env=env).stdout
        return not any(word in status for word in ("Queued", "Running"))

    wait_for(queue_empty, "the queue to empty", timeout=600, pause=5)  # each look starts DVC
    logs = {name: run(["dvc", "queue", "logs", name], cwd=repo, env=env, check=False) for name in QUEUED}
    logged = "".join(log.stdout + log.stderr for log in logs.values())
    return subprocess.CompletedProcess([], 0, status, logged)


README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
MAKE_EXP = 'make exp ARGS="-S model.layers=4"'


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def shell_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[line.split("  #")[0].strip() for line in b.splitlines() if line.strip()] for b in blocks]


def fresh_shell(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """bash with a bare PATH, as a new terminal on a machine where nothing is activated."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]  # the suite's machine setting (conftest)
    assert str(REPO_ROOT / ".venv") not in env["PATH"]
    return subprocess.run(
        ["bash", "-c", "set -e\n" + script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def run_readme_commands(done: Experiments) -> None:
    """The README's experiment, `make exp` (a sampling setting changed: only sample and register
    re-run, each through the venv's python) and its sampling and scoring commands, in that order."""
    (done.repo / ".venv").symlink_to(REPO_ROOT / ".venv")  # the venv `make` created, as on a user's clone
    experiment = shell_blocks(section("Experiments"))[0][:2]
    done.outputs["readme-experiment-commands"] = subprocess.CompletedProcess([], 0, "\n".join(experiment), "")
    done.outputs["readme-experiment"] = fresh_shell("\n".join(experiment), done.repo)
    done.readme_run_id = json.loads((done.repo / "metrics/train.json").read_text())["mlflow_run_id"]
    make_exp = MAKE_EXP.replace('layers=4"', 'layers=4 -S sample.temperature=0.7"')
    done.outputs["make-exp"] = fresh_shell(make_exp, done.repo)
    done.outputs["params-after-make-exp"] = subprocess.CompletedProcess(
        [], 0, (done.repo / "params.yaml").read_text(), ""
    )
    sampling = shell_blocks(section("Evaluation, sampling, scoring"))[0]
    done.outputs["readme-sampling-commands"] = subprocess.CompletedProcess([], 0, "\n".join(sampling), "")
    done.outputs["readme-sampling"] = fresh_shell("\n".join(sampling), done.repo)


@pytest.fixture(scope="module")
def experiments(tmp_path_factory: pytest.TempPathFactory, repro_repo: tuple[Path, str]) -> Experiments:
    repo = copy_of_repro_repo(repro_repo, tmp_path_factory.mktemp("experiments") / "repo")
    env = tool_env(repo)
    done = Experiments(repo, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "baseline results"], cwd=repo)
    baseline_params = (repo / "params.yaml").read_text()

    run_readme_commands(done)
    (repo / "params.yaml").write_text(baseline_params)  # back to the baseline for what follows

    run(["dvc", "exp", "run", "--queue", *FAILING], cwd=repo, env=env)
    run(["dvc", "exp", "run", "--queue", "-n", "processes2", "-S", "train.processes=2"], cwd=repo, env=env)
    params_file = repo / "params.yaml"
    done.outputs["params-before-queue"] = subprocess.CompletedProcess([], 0, params_file.read_text(), "")
    done.outputs["queue"] = run_queue(repo, env, jobs=2)
    done.outputs["params-after-queue"] = subprocess.CompletedProcess([], 0, params_file.read_text(), "")
    done.outputs["bad-param"] = run(
        ["dvc", "exp", "run", "--temp", "-n", "badparam", "-S", "model.hidden=-3"],
        cwd=repo,
        env=env,
        check=False,
    )
    return done


def test_the_readme_experiment_runs_as_printed_into_its_own_mlflow_run(experiments: Experiments) -> None:
    commands = experiments.outputs["readme-experiment-commands"].stdout.splitlines()
    assert commands == ["source .venv/bin/activate", "dvc exp run -S model.layers=4"]
    done = experiments.outputs["readme-experiment"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_ = experiments.client().get_run(experiments.readme_run_id)
    assert run_.data.params["model.layers"] == "4" and run_.info.status == "FINISHED"
    name = run_.data.tags["dvc_experiment"]
    assert run_.info.run_name == name  # named after the experiment, as the README says
    assert f"dvc exp apply {name}" in run_.data.tags["mlflow.note.content"]
    shown = run(["dvc", "exp", "show", "--json"], cwd=experiments.repo, env=experiments.env).stdout
    assert name in shown and run_.info.run_id in shown


def test_make_exp_runs_without_activating(experiments: Experiments) -> None:
    assert MAKE_EXP in README
    done = experiments.outputs["make-exp"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Running stage 'sample'" in done.stdout  # a stage ran, with the venv's python from PATH
    params = yaml.safe_load(experiments.outputs["params-after-make-exp"].stdout)
    assert params["model"]["layers"] == 4 and params["sample"]["temperature"] == 0.7


def test_the_sampling_and_scoring_commands_run_as_printed(experiments: Experiments) -> None:
    commands = experiments.outputs["readme-sampling-commands"].stdout.splitlines()
    assert [c.split()[1] if c.startswith(".venv") else c.split("|")[1].split()[1] for c in commands] == [
        "sample",
        "sample",
        "score",
    ]
    done = experiments.outputs["readme-sampling"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("ROMEO:") and "bits per character " in done.stdout


def test_two_process_experiment_is_one_finished_run_registered_and_servable(
    experiments: Experiments, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pyfunc
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{experiments.repo / 'mlflow.db'}")
    client = experiments.client()
    experiment = client.get_experiment_by_name("lstm-textgen")
    (trained,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'processes2'")
    assert trained.info.status == "FINISHED"
    assert trained.data.tags["world_size"] == "2" and trained.data.tags["backend"] == "gloo"
    assert trained.data.params["train.processes"] == "2"
    assert trained.data.metrics["final_processes"] == 2 and "val_loss" in trained.data.metrics
    assert "eval.test.loss" in trained.data.metrics  # evaluate logged into the same run
    versions = client.search_model_versions("name = 'lstm-textgen-shakespeare-char'")
    (version,) = [v for v in versions if v.run_id == trained.info.run_id]
    served = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    text = served.predict(pd.DataFrame({"prompt": ["ROMEO:"], "max_new_tokens": [12], "seed": [1]}))["text"][
        0
    ]
    assert len(text) == 12


def test_experiments_run_two_at_a_time_land_in_the_store_and_a_failing_one_harms_none(
    experiments: Experiments,
) -> None:
    client = experiments.client()
    experiment = client.get_experiment_by_name("lstm-textgen")
    queue = experiments.outputs["queue"]
    assert "database is locked" not in queue.stdout + queue.stderr
    statuses = dict(re.findall(r"^\s*[0-9a-f]+\s+(\S+)\s.*?(Success|Failed)\s*$", queue.stdout, flags=re.M))
    assert statuses == {"sidefail": "Failed", **{name: "Success" for name in SUCCEEDING}}, queue.stdout
    shown = json.dumps(
        json.loads(run(["dvc", "exp", "show", "--json"], cwd=experiments.repo, env=experiments.env).stdout)
    )
    versions = client.search_model_versions("name = 'lstm-textgen-shakespeare-char'")
    for name in SUCCEEDING:
        (found,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
        assert found.info.status == "FINISHED"
        assert not str(found.info.artifact_uri).count(".dvc/tmp")
        assert name in shown and found.info.run_id in shown
        assert len([v for v in versions if v.run_id == found.info.run_id]) == 1


def test_champion_is_the_lowest_validation_loss_whatever_the_finishing_order(
    experiments: Experiments,
) -> None:
    client = experiments.client()
    versions = client.search_model_versions("name = 'lstm-textgen-shakespeare-char'")
    best = min(versions, key=lambda v: (float(v.tags["val_loss"]), int(v.version)))
    champion = client.get_model_version_by_alias("lstm-textgen-shakespeare-char", "champion")
    assert champion.version == best.version


def test_a_bad_param_stops_the_experiment_before_any_run_exists(experiments: Experiments) -> None:
    bad = experiments.outputs["bad-param"]
    assert bad.returncode != 0
    assert "model.hidden" in bad.stdout + bad.stderr
    client = experiments.client()
    experiment = client.get_experiment_by_name("lstm-textgen")
    assert client.search_runs([experiment.experiment_id], "attributes.run_name = 'badparam'") == []


def test_failing_experiment_is_marked_failed_and_leaves_the_rest_intact(experiments: Experiments) -> None:
    output = experiments.outputs["queue"].stderr  # the queued experiments' logs
    assert "training diverged" in output and "lower train.lr" in output
    assert "marked FAILED" in output and "make ui" in output
    failed = experiments.runs()["sidefail"]
    assert failed.info.status == "FAILED" and "diverged" in failed.data.tags["error"]
    params = yaml.safe_load(experiments.outputs["params-after-queue"].stdout)
    assert params["train"]["lr"] != 10  # the workspace keeps the baseline's params
    assert params == yaml.safe_load(experiments.outputs["params-before-queue"].stdout)
    champion = experiments.client().get_model_version_by_alias("lstm-textgen-shakespeare-char", "champion")
    assert champion.tags["run_id"] != failed.info.run_id


def test_compare_table_lists_the_runs(experiments: Experiments, tmp_path: Path) -> None:
    env = {**experiments.env, "MLFLOW_TRACKING_URI": f"sqlite:///{experiments.repo / 'mlflow.db'}"}
    out = tmp_path / "runs.md"
    result = run(
        [
            "lstm-textgen",
            "compare",
            "--markdown",
            str(out),
            "--plot",
            str(tmp_path / "runs.png"),
            "--runs",
            f"{experiments.readme_run_id},processes2",
        ],
        cwd=tmp_path,
        env=env,
    )
    table = out.read_text()
    readme_experiment = experiments.client().get_run(experiments.readme_run_id).info.run_name
    for name in (readme_experiment, "processes2", "sidefail"):
        assert f"| {name} |" in table, name
    assert table.splitlines()[0].startswith("| run_id | run | experiment | status | corpus | level | cell")
    assert "FAILED" in table and "val_loss" in result.stdout
    assert (tmp_path / "runs.png").read_bytes()[:4] == b"\x89PNG"


def test_mlflow_ui_serves_the_runs_over_rest(experiments: Experiments) -> None:
    port = free_port()
    ui = subprocess.Popen(
        [
            "mlflow",
            "ui",
            "--backend-store-uri",
            f"sqlite:///{experiments.repo / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=experiments.repo,
        env={**SERVER_DEFAULTS, **experiments.env},  # as `lstm-textgen ui` starts it: no job runner
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: page_ok(f"{base}/health"), "the MLflow UI to answer", process=ui, pause=0.5)
        experiment = requests.get(
            f"{base}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": "lstm-textgen"},
            timeout=10,
        ).json()["experiment"]
        found = requests.post(
            f"{base}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [experiment["experiment_id"]], "max_results": 100},
            timeout=10,
        ).json()["runs"]
        names = {r["info"]["run_name"] for r in found}
        readme_experiment = experiments.client().get_run(experiments.readme_run_id).info.run_name
        assert {"processes2", "sidefail", readme_experiment} <= names
    finally:
        ui.terminate()
        ui.wait(timeout=20)

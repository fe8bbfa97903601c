"""Killed training for real: the train stage under `dvc repro` is sent SIGKILL, and once resumed
SIGTERM, each between two evaluations, resumed with `train.resume=true` and compared bit for bit with
a run that was never interrupted; the MLflow run is the same one, KILLED in between, FINISHED at the
end. (Resuming with dropout, carried state or the last-token objective: test_model_training.py, in
process; several ranks stopped by SIGTERM: test_distributed.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_training,
    edit_params,
    prepared_tiny_repo,
    run,
    store_client,
    tool_env,
    wait_for,
)

pytestmark = pytest.mark.slow

# Long enough to be killed between the evaluations at steps 1000 and 2000 (a tiny model: seconds).
LONG = {"max_steps": 3000, "eval_every": 1000, "eval_batches": 2, "batch_size": 8, "threads": 1}
LONG |= {"dtype": "float32", "device": "cpu"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, repro_repo: tuple[Path, str]) -> Path:
    return prepared_tiny_repo(repro_repo, tmp_path_factory.mktemp("interrupted") / "repo", train=LONG)


def assert_bit_for_bit(a: Path, b: Path) -> None:
    assert_same_training(torch.load(a, weights_only=True), torch.load(b, weights_only=True), exact=True)


def checkpoint_step(checkpoint: Path) -> int:
    """The step of the checkpoint on disk (-1 while there is none): it is replaced by a rename, whole."""
    try:
        return torch.load(checkpoint, weights_only=True)["step"]
    except FileNotFoundError:
        return -1


def stop_after_evaluation(repo: Path, job: subprocess.Popen[str], step: int, sig: int) -> None:
    """Wait for the checkpoint of `step`, let some steps pass, then send `sig` to the train stage."""
    pid = train_process(repo)
    checkpoint = repo / "data/checkpoints/last.pt"
    wait_for(lambda: checkpoint_step(checkpoint) == step, f"the step-{step} checkpoint", process=job)
    time.sleep(0.3)
    os.kill(pid, sig)


def train_process(repo: Path, timeout: float = 60) -> int:
    """The pid of the train stage that `dvc repro` started in `repo`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                cwd = (proc / "cwd").resolve()
            except OSError:
                continue
            if cwd == repo.resolve() and is_train_interpreter(cmdline):
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError("the train stage never started")


def is_train_interpreter(cmdline: list[bytes]) -> bool:
    """Python running the train stage, not the `sh -c` that DVC may keep as its parent: a shell that
    does not exec its last command would take the signal while training went on without it."""
    program = Path(cmdline[0].decode(errors="replace")).name
    return program.startswith("python") and b"stages/train.py" in cmdline[1:]


def mlflow_run(repo: Path, run_id: str):
    return store_client(repo).get_run(run_id)


@pytest.fixture(scope="module")
def straight(repo: Path) -> dict:
    """One uninterrupted training and its evaluation (`dvc repro evaluate`: sample and register run at
    the resumed pipeline's end): what both killed-and-resumed runs must end with."""
    edit_params(repo / "params.yaml", train={"resume": False})
    run(["dvc", "repro", "evaluate"], cwd=repo)
    (repo / "straight.pt").write_bytes((repo / "data/checkpoints/last.pt").read_bytes())
    return {"evaluate": json.loads((repo / "metrics/evaluate.json").read_text())}


def start_train(repo: Path, *, resume: bool) -> subprocess.Popen[str]:
    edit_params(repo / "params.yaml", train={"resume": resume})
    command = ["dvc", "repro"] if resume else ["dvc", "repro", "-f", "train"]
    return subprocess.Popen(
        command, cwd=repo, env=tool_env(repo), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_killed_then_stopped_dvc_repro_resumes_the_same_mlflow_run_to_the_same_result(
    repo: Path, straight: dict
) -> None:
    """SIGKILL after the first evaluation (nothing can mark the run), resume, SIGTERM after the
    second (a stop request: the run is KILLED, the step saved), resume again to the end: the same
    MLflow run all along, and the weights of the run that was never interrupted, bit for bit."""
    (repo / "data/checkpoints/last.pt").unlink()  # so the wait below sees this run's first checkpoint
    job = start_train(repo, resume=False)
    stop_after_evaluation(repo, job, 1000, signal.SIGKILL)
    job.communicate(timeout=120)
    assert job.returncode != 0
    killed = torch.load(repo / "data/checkpoints/last.pt", weights_only=True)
    run_id = killed["labels"]["mlflow_run_id"]
    assert killed["step"] == 1000 and mlflow_run(repo, run_id).info.status == "RUNNING"

    job = start_train(repo, resume=True)
    stop_after_evaluation(repo, job, 2000, signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    assert f"continuing MLflow run {run_id}" in stdout
    stopped = torch.load(repo / "data/checkpoints/last.pt", weights_only=True)
    assert stopped["step"] > 2000 and stopped["labels"]["mlflow_run_id"] == run_id
    assert mlflow_run(repo, run_id).info.status == "KILLED"
    assert "Traceback" not in stderr  # a stop request, said in a line: the step it saved

    resumed = run(["dvc", "repro"], cwd=repo)
    assert "Running stage 'train'" in resumed.stdout  # never answered from the run cache
    assert f"continuing MLflow run {run_id}" in resumed.stdout
    assert_bit_for_bit(repo / "data/checkpoints/last.pt", repo / "straight.pt")
    assert json.loads((repo / "metrics/evaluate.json").read_text()) == straight["evaluate"]
    finished = mlflow_run(repo, run_id)
    assert finished.info.status == "FINISHED"
    steps = [m.step for m in store_client(repo).get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == [1000, 2000, 3000]  # one curve, each evaluation once
    assert json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"] == run_id

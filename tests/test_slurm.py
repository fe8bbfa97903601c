"""The pipeline under SLURM: `lstm-textgen slurm submit` on a real one-node cluster of this machine
(munged, slurmctld and slurmd, `slurm_cluster.py`) runs `dvc exp run` as a batch job whose train
stage spreads over the allocation with srun and torchrun; `slurm status` follows it; the errors that
SLURM would report late are named before anything is submitted."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import slurm_cluster
from conftest import prepared_tiny_repo, require_installed, run, runs_by_name, tiny_repo, tool_env

from lstm_textgen.apps.slurm import JobSpec, batch_script, minutes
from lstm_textgen.train.slurm import Allocation, allocation_from_env, launch_command


def test_the_batch_script_asks_for_what_the_job_needs() -> None:
    settings = ["-S", "model.layers=3"]
    spec = JobSpec("layers3", settings, nodes=2, gpus_per_node=4, time="4:00:00", requeue=True)
    script = batch_script(spec, Path("/lab/repo"), Path("/lab/venv/bin/python"), Path("/lab/log-%j"))
    for line in (
        "#SBATCH --job-name=lstm-textgen-layers3",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=4:00:00",
        "#SBATCH --signal=B:TERM@120",
        "#SBATCH --requeue",
        "cd /lab/repo",
        "    exec dvc exp run --name layers3 -S model.layers=3",
    ):
        assert line in script.splitlines(), line
    assert minutes("4:00:00") == 240 and minutes("1-12") == 2160 and minutes("30") == 30


def test_the_train_stage_starts_one_torchrun_per_node_meeting_on_the_first_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several nodes, on paper: the allocation as SLURM's environment and `scontrol show hostnames`
    give it (a stand-in scontrol, since one host runs one slurmd), and the command built from it."""
    fake = tmp_path / "scontrol"
    expanded = 'printf "gpu07\\ngpu08\\ngpu11\\n"'
    fake.write_text(f'#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08,11]" ] && {expanded}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    environment = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08,11]", "SLURM_RESTART_COUNT": "0"}
    allocation = allocation_from_env("auto", environment)
    assert allocation == Allocation("4242", ("gpu07", "gpu08", "gpu11"), restarts=0)
    assert allocation_from_env("local", environment) is None and allocation_from_env("auto", {}) is None
    command = launch_command(allocation, 4, ["stages/train.py"])
    assert command[:5] == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--nnodes=3" in command and "--nproc-per-node=4" in command and "--rdzv-id=4242" in command
    assert "--rdzv-endpoint=gpu07:29642" in command and command[-1] == "stages/train.py"
    assert allocation.tags(12)["slurm.world_size"] == "12"


def test_submit_names_each_problem_before_submitting(tmp_path: Path) -> None:
    env = tool_env(tmp_path) | {"PATH": str(Path(sys.executable).parent)}  # no sbatch there
    command = ["lstm-textgen", "slurm", "submit", "--", "-S", "train.max_steps=5"]
    refused = run(command, tmp_path, env, check=False)
    assert refused.returncode != 0 and "sbatch is not on PATH" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / ".slurm").exists()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho should-not-run; exit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    short = run(["lstm-textgen", "slurm", "submit", "--time", "1"], tmp_path, env, check=False)
    assert short.returncode != 0 and "leaves no time to train before the SIGTERM" in short.stderr
    bad = run(["lstm-textgen", "slurm", "submit", "--time", "soon"], tmp_path, env, check=False)
    assert bad.returncode != 0 and "sbatch's form" in bad.stderr
    gpu_less = ["lstm-textgen", "slurm", "submit", "--", "-S", "train.device=cuda"]
    cuda = run(gpu_less, tmp_path, env, check=False)
    assert cuda.returncode != 0 and "asks for no GPU: add --gpus-per-node" in cuda.stderr


@pytest.fixture(scope="module")
def cluster() -> Iterator[slurm_cluster.Cluster]:
    for daemon in slurm_cluster.DAEMONS:
        require_installed(Path(daemon), "slurm-wlm munge")
    base = Path(tempfile.mkdtemp(prefix="lstm-textgen-slurm-"))
    base.chmod(0o755)  # munged runs as its own user and must reach its folder
    started = slurm_cluster.start(base / "cluster")
    try:
        yield started
    finally:
        slurm_cluster.stop(started)
        shutil.rmtree(base, ignore_errors=True)


def job_state(cluster: slurm_cluster.Cluster, job: str) -> str:
    shown = cluster.run("scontrol", "show", "job", job, check=False).stdout
    return next((part.split("=", 1)[1] for part in shown.split() if part.startswith("JobState=")), "")


def wait_for_job(cluster: slurm_cluster.Cluster, job: str, log: Path, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while (state := job_state(cluster, job)) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", ""):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} still {state} after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return state


def submitted(cluster: slurm_cluster.Cluster, repo: Path, *command: str) -> tuple[dict[str, str], str]:
    """`lstm-textgen slurm COMMAND...` run in `repo` against the cluster: its environment and job id."""
    env = tool_env(repo) | cluster.env()
    done = run(["lstm-textgen", "slurm", *command], repo, env)
    return env, done.stdout.split("submitted job ", 1)[1].split()[0]


def training(cluster: slurm_cluster.Cluster, job: str, repo: Path, timeout: float = 600) -> None:
    """Until the job's train stage has written a checkpoint: training, its MLflow run open, with a
    state to resume from; the job must stay queued or running meanwhile."""
    deadline = time.monotonic() + timeout
    while not (repo / "data" / "checkpoints" / "last.pt").is_file():
        assert time.monotonic() < deadline and job_state(cluster, job) in ("PENDING", "RUNNING"), job
        time.sleep(0.2)


@pytest.mark.slow
def test_a_submitted_experiment_trains_on_two_workers_and_is_followed(
    cluster: slurm_cluster.Cluster, repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    repo = prepared_tiny_repo(repro_repo, tmp_path / "repo")
    env, job = submitted(cluster, repo, "submit", "--name", "slurm2", "--", "-S", "train.processes=2")
    log = repo / ".slurm" / "slurm2" / f"slurm-{job}.log"
    assert (repo / ".slurm" / "slurm2" / "job.sbatch").is_file()
    state = wait_for_job(cluster, job, log)
    output = log.read_text()
    assert state == "COMPLETED", output[-4000:]
    assert f"SLURM job {job}: 1 node(s) x 2 worker(s) = 2" in output
    logged = runs_by_name(repo)["slurm2"]
    assert logged.info.status == "FINISHED" and "eval.val.loss" in logged.data.metrics
    assert logged.data.tags["slurm.job_id"] == job and logged.data.tags["slurm.world_size"] == "2"
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    assert "slurm2" in json.dumps(shown)
    registered = json.loads((repo / "metrics" / "register.json").read_text())
    assert registered["model_uri"].startswith("models:/")  # trained, evaluated and registered
    followed = run(["lstm-textgen", "slurm", "status", job], repo, env)
    assert "COMPLETED" in followed.stdout and logged.info.run_id in followed.stdout


@pytest.mark.slow
def test_a_requeued_job_resumes_into_the_same_run_and_experiment(
    cluster: slurm_cluster.Cluster, repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    """`scontrol requeue` mid-training, as a preemption: SIGTERM, the job back in the queue, then run
    again from its script; the train stage resumes from its last checkpoint into the same MLflow run,
    and ends with the weights of the same experiment run without a break, bit for bit."""
    import torch

    from lstm_textgen.model.checkpoint import load_model

    repo = prepared_tiny_repo(repro_repo, tmp_path / "repo")
    settings = ["-S", "train.max_steps=300", "-S", "train.eval_every=25"]
    settings += ["-S", "train.dtype=float32", "-S", "train.threads=1"]  # bit for bit on any CPU
    env, job = submitted(cluster, repo, "submit", "--name", "requeued", "--requeue", "--", *settings)
    log = repo / ".slurm" / "requeued" / f"slurm-{job}.log"
    training(cluster, job, repo)
    cluster.run("scontrol", "requeue", job)
    deadline = time.monotonic() + 120
    while job_state(cluster, job) != "PENDING":
        assert time.monotonic() < deadline, job_state(cluster, job)
        time.sleep(0.5)
    state = wait_for_job(cluster, job, log)  # it starts again once its old credential has expired
    output = log.read_text()
    assert state == "COMPLETED", output[-4000:] + "\n" + cluster.log_tails()
    assert "restart 1" in output and f"requeued SLURM job {job} (restart 1): resuming" in output
    runs = [r for r in runs_by_name(repo).values() if r.data.tags.get("slurm.job_id") == job]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info for r in runs]
    assert runs[0].data.tags["slurm.restarts"] == "1"
    history = json.loads((repo / "metrics" / "train.json").read_text())
    assert history["mlflow_run_id"] == runs[0].info.run_id
    assert "requeued" in json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout))
    steps = {"max_steps": 300, "eval_every": 25, "dtype": "float32", "threads": 1}
    plain = prepared_tiny_repo(repro_repo, tmp_path / "plain", train=steps)
    run(["dvc", "repro", "train"], plain)  # the same training, outside SLURM, never stopped
    weights = [load_model(r / "data" / "model" / "model.pt").model.state_dict() for r in (repo, plain)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


@pytest.mark.slow
def test_a_cancelled_job_leaves_no_running_mlflow_run_and_no_process(
    cluster: slurm_cluster.Cluster, tmp_path: Path
) -> None:
    import psutil

    # its own `dvc repro prepare`, not a copy of repro_repo: from a copy (no MLflow store yet) this
    # test found no store in the repository after the cancel (not yet understood)
    repo = tiny_repo(tmp_path / "repo")
    run(["dvc", "repro", "prepare"], repo)
    _, job = submitted(cluster, repo, "submit", "--name", "cancelled", "--", "-S", "train.max_steps=100000")
    training(cluster, job, repo)
    cluster.run("scancel", job)
    wait_for_job(cluster, job, repo / ".slurm" / "cancelled" / f"slurm-{job}.log", timeout=120)

    def leftovers() -> list[str]:
        found = []
        for process in psutil.process_iter(["cmdline", "cwd"]):
            with contextlib.suppress(psutil.Error):
                if process.info["cwd"] and process.info["cwd"].startswith(str(repo)):
                    found.append(" ".join(process.info["cmdline"] or []))
        return found

    deadline = time.monotonic() + 60  # SLURM's SIGTERM, then its SIGKILL after KillWait
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left
    assert runs_by_name(repo)["cancelled"].info.status != "RUNNING"


@pytest.mark.slow
def test_a_search_job_shares_one_study_among_its_tasks(
    cluster: slurm_cluster.Cluster, repro_repo: tuple[Path, str], tmp_path: Path
) -> None:
    from test_tune import study, trial_runs, tune_repo

    space = {"model.hidden": {"choices": [16, 24, 32]}, "train.lr": {"low": 0.003, "high": 0.03, "log": True}}
    repo = tune_repo(
        repro_repo, tmp_path / "repo", space, study="slurmpair", sampler="random", experiment=False
    )
    _, job = submitted(cluster, repo, "submit-tune", "--workers", "2", "--trials", "4")
    log = repo / ".slurm" / "tune-slurmpair" / f"slurm-{job}.log"
    state = wait_for_job(cluster, job, log)
    output = log.read_text()
    assert state == "COMPLETED", output[-4000:]
    assert f"tune: 2 workers as the tasks of SLURM job {job}" in output
    assert sorted(t.number for t in study(repo, "slurmpair").trials) == [0, 1, 2, 3]
    runs = trial_runs(repo)
    assert sorted(r.data.tags["tune.trial"] for r in runs) == ["0", "1", "2", "3"]
    assert {r.data.tags["slurm.job_id"] for r in runs} == {job}
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1

"""Data-parallel training for real: worker processes started by torchrun's launcher (the train stage
with `train.processes`) and by the `torchrun` command, gloo on the CPU, real signals.

Every distributed run starts real processes (a few seconds each); the runs that several tests compare
are made once per module."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_training,
    edit_params,
    free_port,
    prepared_tiny_repo,
    run,
    runs_by_name,
    tool_env,
    train_stage_command,
    wait_for,
)

from lstm_textgen.train.batches import WindowBatcher
from lstm_textgen.train.distributed import root_failure
from lstm_textgen.train.state import TrainState

# Constant learning rate: a run stopped at step 10 and resumed to 20 follows the same schedule as
# one that ran 20 steps straight.
RUN = {"max_steps": 20, "eval_every": 10, "eval_batches": 2, "schedule": "constant", "warmup_steps": 2}
RUN |= {"dtype": "float32", "device": "cpu", "threads": 1}


# ---- the batch drawing, in one process ----


@pytest.mark.parametrize("stateful", [False, True])
def test_ranks_take_disjoint_slices_of_the_one_process_batch(stateful: bool) -> None:
    tokens = torch.arange(5000, dtype=torch.int32)

    def batcher(batch: int, rank: int = 0, world: int = 1) -> WindowBatcher:
        return WindowBatcher(
            tokens,
            16,
            batch,
            stateful=stateful,
            generator=torch.Generator().manual_seed(7),
            rank=rank,
            world_size=world,
        )

    whole, ranks = batcher(8), [batcher(4, rank, 2) for rank in range(2)]
    for _ in range(5):
        expected, reset = whole.next()
        parts = [b.next() for b in ranks]
        assert torch.equal(torch.cat([chunk for chunk, _ in parts]), expected)
        assert all(part_reset == reset for _, part_reset in parts)
    if stateful:  # each rank's streams are one contiguous stretch after the other's
        first, second = (b.next()[0][:, 0] for b in ranks)
        assert first.max() < second.min()


def test_checkpoint_joins_the_ranks_carried_states_and_each_rank_takes_its_own_back() -> None:
    def state(rank: int) -> TrainState:
        model = torch.nn.LSTM(2, 3)
        batcher = WindowBatcher(
            torch.arange(500), 8, 2, stateful=True, generator=torch.Generator(), rank=rank, world_size=2
        )
        carried = (torch.full((1, 2, 3), float(rank)), torch.full((1, 2, 3), 10.0 + rank))
        optimizer, scaler = torch.optim.SGD(model.parameters()), torch.amp.GradScaler("cpu", enabled=False)
        return TrainState(model, optimizer, scaler, batcher, carried=carried)  # type: ignore[arg-type]

    zero, one = state(0), state(1)
    saved = zero.state_dict([zero.rank_part(), one.rank_part()])
    assert saved["world_size"] == 2 and len(saved["rng"]["ranks"]) == 2
    h, c = saved["carried_state"]
    assert h.shape == c.shape == (1, 4, 3) and h[0, :, 0].tolist() == [0, 0, 1, 1]
    one.carried = None
    one.load_state_dict(saved, rank=1)
    assert torch.equal(one.carried[0], torch.ones(1, 2, 3)) and torch.equal(
        one.carried[1], torch.full((1, 2, 3), 11.0)
    )


def test_the_failure_named_is_the_cause_not_its_consequences() -> None:
    assert root_failure({0: 75, 1: -9}) == (1, -9)  # rank 0 only lost its peer
    assert root_failure({0: 143, 1: 2, 2: 75}) == (1, 2)  # rank 0 was stopped by torchrun
    assert root_failure({0: 2, 1: 2}) == (0, 2)  # a shared decision: the lowest rank


# ---- the train stage on several processes ----


@pytest.fixture(scope="module")
def prepared_repo(tmp_path_factory: pytest.TempPathFactory, repro_repo: tuple[Path, str]) -> Path:
    return prepared_tiny_repo(repro_repo, tmp_path_factory.mktemp("distributed") / "repo")


def train_stage(
    repo: Path,
    name: str,
    processes: int,
    batch_size: int,
    wait: bool = True,
    model: dict | None = None,
    **train: object,
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """Run the train stage as DVC would (`python stages/train.py`), outputs under `runs/<name>`."""
    out = repo / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    train_values = {**RUN, "processes": processes, "batch_size": batch_size, **train}
    edit_params(repo / "params.yaml", out / "params.yaml", train=train_values, model=model or {})
    cmd = train_stage_command(out / "params.yaml", out)
    env = {**tool_env(repo), "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return run(cmd, cwd=repo, env=env)


def saved(repo: Path, name: str) -> dict:
    return torch.load(repo / "runs" / name / "last.pt", weights_only=True)


@pytest.mark.slow
def test_two_processes_train_exactly_as_one_with_twice_the_batch(prepared_repo: Path) -> None:
    """Stateless windows here; carried state on two processes: the world-size switch below."""
    train_stage(prepared_repo, "one-stateless", processes=1, batch_size=8, stateful=False)
    two = train_stage(prepared_repo, "two-stateless", processes=2, batch_size=4, stateful=False)
    assert "x 2 processes" in two.stdout
    assert_same_training(saved(prepared_repo, "two-stateless"), saved(prepared_repo, "one-stateless"))
    (mlflow_run,) = list(
        runs_by_name(prepared_repo / "runs" / "two-stateless" / "mlflow.db").values()
    )  # exactly one run for two processes
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["world_size"] == "2" and mlflow_run.data.tags["backend"] == "gloo"
    assert mlflow_run.data.metrics["final_processes"] == 2
    # rank 0 saved the unwrapped model: a single process loads it as it loads any checkpoint
    from lstm_textgen.model.checkpoint import load_model

    assert load_model(prepared_repo / "runs" / "two-stateless" / "model" / "model.pt").model.training is False


@pytest.mark.slow
def test_a_resume_on_another_world_size_with_the_same_global_batch_continues_the_run(
    prepared_repo: Path,
) -> None:
    """Two processes with carried state for 10 steps, then one with twice the batch: the same weights
    as one process all along, so the two ranks' windows and states were exactly one process's."""
    train_stage(prepared_repo, "switch", processes=2, batch_size=4, stateful=True, max_steps=10)
    resumed = train_stage(prepared_repo, "switch", processes=1, batch_size=8, stateful=True, resume=True)
    assert "resumed from" in resumed.stdout and "other windows" not in resumed.stdout
    train_stage(prepared_repo, "one-stateful", processes=1, batch_size=8, stateful=True)
    assert_same_training(saved(prepared_repo, "switch"), saved(prepared_repo, "one-stateful"))


@pytest.mark.slow
def test_divergence_is_decided_once_and_reported_once(prepared_repo: Path) -> None:
    failed = train_stage(
        prepared_repo,
        "diverge",
        2,
        4,
        wait=False,
        model={"cell": "rnn"},
        lr=10.0,
        grad_clip=0.0,
        warmup_steps=0,
        max_steps=400,  # stopped at the first check after it diverges
    )
    _, stderr = failed.communicate(timeout=300)
    assert failed.returncode != 0
    assert stderr.count("training diverged") == 1, stderr
    assert "lower train.lr" in stderr and re.search(r"rank [01] exited with code 2", stderr)
    (mlflow_run,) = list(runs_by_name(prepared_repo / "runs" / "diverge" / "mlflow.db").values())
    assert mlflow_run.info.status == "FAILED"


def worker_pids(launcher: int) -> dict[int, int]:
    """The launcher's worker processes, by RANK."""
    pids = {}
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            status = (child / "status").read_text()
            environ = (child / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        ranks = [entry[5:] for entry in environ if entry.startswith(b"RANK=")]
        if parent == launcher and ranks:
            pids[int(ranks[0])] = int(child.name)
    return pids


def gone(pid: int) -> bool:
    proc = Path(f"/proc/{pid}")
    try:
        return not proc.exists() or (proc / "stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def started_workers(
    name: str, prepared_repo: Path, **setting: object
) -> tuple[subprocess.Popen[str], dict[int, int]]:
    """A long two-process training, once its first checkpoint is written, and its workers' pids."""
    job = train_stage(prepared_repo, name, 2, 4, wait=False, max_steps=100000, eval_every=50, **setting)
    checkpoint = prepared_repo / "runs" / name / "last.pt"
    wait_for(checkpoint.is_file, "the first checkpoint", process=job, pause=0.2)
    workers = worker_pids(job.pid)
    assert set(workers) == {0, 1}, workers
    return job, workers


def assert_failed_cleanly(
    name: str, prepared_repo: Path, workers: dict[int, int], status: str = "FAILED"
) -> None:
    wait_for(lambda: all(gone(pid) for pid in workers.values()), "every worker to end", timeout=60, pause=0.2)
    (mlflow_run,) = list(runs_by_name(prepared_repo / "runs" / name / "mlflow.db").values())
    error = mlflow_run.data.tags.get("error", "")
    assert mlflow_run.info.status == status, error
    # gloo words a dead peer either way, depending on when the socket noticed; when the launcher learns
    # first (under load), it fails the run itself with the dead rank's reason
    said = "Connection (reset|closed) by peer|lost contact|SIGTERM|killed by signal 9"
    assert re.search(said, error), error


@pytest.mark.slow
def test_killing_one_worker_fails_the_whole_job_cleanly(prepared_repo: Path) -> None:
    job, workers = started_workers("killed-worker", prepared_repo)
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "rank 1 was killed by signal 9" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert_failed_cleanly("killed-worker", prepared_repo, workers)


@pytest.mark.slow
def test_killing_the_launcher_leaves_no_worker_behind(prepared_repo: Path) -> None:
    """SIGKILL gives the launcher no chance to stop its workers: the kernel tells them (SIGTERM), and
    they stop together as on any stop request: checkpoint, run KILLED."""
    job, workers = started_workers("killed-launcher", prepared_repo)
    job.kill()
    job.communicate(timeout=60)
    assert_failed_cleanly("killed-launcher", prepared_repo, workers, status="KILLED")


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_and_resumes_exactly(
    prepared_repo: Path,
) -> None:
    """A scheduler's SIGTERM reaches the launcher; torchrun passes it to the workers, which agree on
    the step to stop at; rank 0 saves it there. Resumed, the run ends as a straight one does, bit for
    bit: every rank's dropout RNG and carried state come back."""
    setting = {"stateful": True, "model": {"dropout": 0.3}}
    job, workers = started_workers("sigterm", prepared_repo, **setting)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 143, stderr
    assert "Traceback" not in stderr
    stopped_at = saved(prepared_repo, "sigterm")["step"]
    assert stopped_at % 50 == 0 and stopped_at > 0  # the ranks agree every 50 steps
    (mlflow_run,) = list(runs_by_name(prepared_repo / "runs" / "sigterm" / "mlflow.db").values())
    assert mlflow_run.info.status == "KILLED"
    assert all(gone(pid) for pid in workers.values())
    end = {"max_steps": stopped_at + 20, "eval_every": 50}
    train_stage(prepared_repo, "sigterm", 2, 4, resume=True, **end, **setting)
    train_stage(prepared_repo, "sigterm-straight", 2, 4, **end, **setting)
    assert_same_training(
        saved(prepared_repo, "sigterm"), saved(prepared_repo, "sigterm-straight"), exact=True
    )
    (resumed,) = list(runs_by_name(prepared_repo / "runs" / "sigterm" / "mlflow.db").values())
    assert resumed.info.run_id == mlflow_run.info.run_id and resumed.info.status == "FINISHED"


@pytest.mark.slow
def test_two_machines_on_one_host_train_as_one_job(prepared_repo: Path, tmp_path: Path) -> None:
    """The README's multi-machine command, with both "machines" on 127.0.0.1: node 0 holds rank 0,
    which writes the outputs and the one MLflow run."""
    edit_params(prepared_repo / "params.yaml", tmp_path / "params.yaml", train={**RUN, "batch_size": 4})
    port, env = (
        free_port(),
        {**tool_env(prepared_repo), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"},
    )
    nodes = []
    for node in (0, 1):
        out = tmp_path / f"node{node}"
        torchrun = ["torchrun", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}"]
        torchrun.append(f"--rdzv-endpoint=127.0.0.1:{port}")
        cmd = torchrun + train_stage_command(tmp_path / "params.yaml", out)[1:]  # torchrun runs the script
        nodes.append(
            subprocess.Popen(
                cmd, cwd=prepared_repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "x 2 processes" in outputs[0][0]
    assert (tmp_path / "node0" / "model" / "model.pt").is_file()
    assert not (tmp_path / "node1").exists()  # rank 1 writes nothing
    (mlflow_run,) = runs_by_name(env["MLFLOW_TRACKING_URI"]).values()
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["world_size"] == "2"

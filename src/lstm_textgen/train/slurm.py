"""Training inside a SLURM allocation: one torchrun per node started with `srun`, every node's
workers meeting at a c10d rendezvous on the allocation's first host, as torchtitan's
`multinode_trainer.slurm` does. A job that SLURM requeued (preemption, `scontrol requeue`) resumes
from its last checkpoint into the same MLflow run.

Only the train stage uses the allocation's nodes; every other stage runs once, on the batch host.
Outside SLURM (`SLURM_JOB_ID` unset) nothing here applies, unless `train.launcher: slurm` asks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from lstm_textgen.errors import UserError

RENDEZVOUS_PORT_BASE = 29400  # + the job id modulo 1000: two jobs on one head node meet apart


@dataclass(frozen=True)
class Allocation:
    """What SLURM gave this job, from the environment it sets in the batch script."""

    job_id: str
    hosts: tuple[str, ...]
    restarts: int  # SLURM_RESTART_COUNT: how many times the job was requeued

    @property
    def head(self) -> str:
        return self.hosts[0]

    @property
    def rendezvous(self) -> str:
        return f"{self.head}:{RENDEZVOUS_PORT_BASE + int(self.job_id) % 1000}"

    def tags(self, world_size: int) -> dict[str, str]:
        """The MLflow run's tags: which job trained it, where, and how wide."""
        return {
            "slurm.job_id": self.job_id,
            "slurm.nodes": ",".join(self.hosts),
            "slurm.restarts": str(self.restarts),
            "slurm.world_size": str(world_size),
        }


def hostnames(nodelist: str) -> tuple[str, ...]:
    """`scontrol show hostnames` of a compressed node list (`node[01-04]`)."""
    if shutil.which("scontrol") is None:
        raise UserError("SLURM_JOB_ID is set but scontrol is not on PATH: run inside a SLURM job")
    shown = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
    )
    if shown.returncode != 0 or not shown.stdout.split():
        raise UserError(f"scontrol cannot expand the node list {nodelist!r}: {shown.stderr.strip()}")
    return tuple(shown.stdout.split())


def allocation_from_env(launcher: str, env: Mapping[str, str] = os.environ) -> Allocation | None:
    """The allocation this process runs in, per `train.launcher`: `auto` uses one when there is one,
    `slurm` requires one, `local` ignores it."""
    job = env.get("SLURM_JOB_ID")
    if launcher == "local" or (launcher == "auto" and not job):
        return None
    if not job:
        raise UserError(
            "train.launcher is slurm but this is not a SLURM job (no SLURM_JOB_ID): submit it with "
            "`lstm-textgen slurm submit`, or set train.launcher=auto"
        )
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    hosts = hostnames(nodelist) if nodelist else (env.get("SLURMD_NODENAME", "localhost"),)
    return Allocation(job, hosts, int(env.get("SLURM_RESTART_COUNT", "0") or 0))


def launch_command(allocation: Allocation, processes: int, script: list[str]) -> list[str]:
    """srun, one task per node, each a torchrun of `processes` workers running `script`."""
    nodes = len(allocation.hosts)
    return [
        "srun",
        f"--nodes={nodes}",
        f"--ntasks={nodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc-per-node={processes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={allocation.rendezvous}",
        f"--rdzv-id={allocation.job_id}",
        "--max-restarts=0",
        *script,
    ]


def launch_in_allocation(allocation: Allocation, processes: int, script: list[str]) -> None:
    """Run `script` on every node of the allocation; a failed worker fails the stage, naming it."""
    command = launch_command(allocation, processes, script)
    width = len(allocation.hosts) * processes
    print(
        f"train: SLURM job {allocation.job_id}: {len(allocation.hosts)} node(s) x {processes} worker(s) "
        f"= {width}, rendezvous at {allocation.rendezvous}",
        flush=True,
    )
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise UserError(
            f"training in SLURM job {allocation.job_id} failed (srun exited with {done.returncode}); "
            "the workers' errors are above"
        )


def tasks_in_job(env: Mapping[str, str] = os.environ) -> int:
    """How many tasks this SLURM job was given (`--ntasks`); 0 outside a job."""
    if not env.get("SLURM_JOB_ID"):
        return 0
    return int(env.get("SLURM_NTASKS", "1") or 1)


def srun_tasks(count: int, command: list[str]) -> list[str]:
    """`command` as `count` tasks of this job, wherever SLURM placed them; one that fails leaves the
    others running (a search's worker dies alone: its trial fails by its heartbeat)."""
    return ["srun", f"--ntasks={count}", "--kill-on-bad-exit=0", *command]

"""A one-node SLURM cluster of this machine for the tests (../shared/notes/slurm-facts.md): munged,
slurmctld and slurmd started as root on free ports from a folder of their own, and stopped by the
pids in their pid files. Clients reach it through `SLURM_CONF`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lstm_textgen.network import free_port

CRED_EXPIRE_S = 30
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch")


@dataclass
class Cluster:
    root: Path
    conf: Path
    munge_socket: Path
    partition: str = "main"

    def env(self) -> dict[str, str]:
        """What a client needs: the cluster's slurm.conf (munge's socket is in slurm.conf)."""
        return {"SLURM_CONF": str(self.conf)}

    def log_tails(self, lines: int = 30) -> str:
        """The last lines slurmctld and slurmd logged: for an assertion's message."""
        tails = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            text = path.read_text(errors="replace") if path.is_file() else "(none)"
            tails.append(f"--- {name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(tails)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = os.environ | self.env()
        return subprocess.run(command, env=env, capture_output=True, text=True, check=check)


def slurm_conf(root: Path, host: str, munge_socket: Path) -> str:
    cpus = os.cpu_count() or 2
    return "\n".join(
        [
            "ClusterName=lstmtextgen",
            f"SlurmctldHost={host}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            # a job's credential lives this long (default 120 s), and a requeued job waits as long
            # before it starts again: slurmd refuses to launch it sooner ("Job credential revoked")
            f"AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            "SlurmUser=root",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobRequeue=1",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            f"NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN",
            f"PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def start_munge(root: Path) -> Path:
    munge = root / "munge"
    munge.mkdir()
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    shutil.chown(munge, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    munge_socket = munge / "munge.socket"
    subprocess.run(
        [
            "runuser", "-u", "munge", "--", "/usr/sbin/munged",
            f"--key-file={key}", f"--socket={munge_socket}", f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}",
        ],
        check=True,
    )  # fmt: skip
    return munge_socket


def start(root: Path) -> Cluster:
    """Start the cluster under `root`; the node is idle when this returns."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # munged (its own user) must reach its folder
    (root / "state").mkdir()
    (root / "spool").mkdir()
    munge_socket = start_munge(root)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host, munge_socket))
    cluster = Cluster(root, conf, munge_socket)
    subprocess.run(["/usr/sbin/slurmctld", "-f", str(conf)], check=True, env=os.environ | cluster.env())
    subprocess.run(["/usr/sbin/slurmd", "-f", str(conf)], check=True, env=os.environ | cluster.env())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
        if state == "idle":
            return cluster
        time.sleep(0.5)
    raise RuntimeError(f"the SLURM node never became idle (sinfo: {state!r})\n{cluster.log_tails()}")


def stop(cluster: Cluster) -> None:
    for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
        path = cluster.root / pid_file
        if path.is_file():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(path.read_text().strip()), signal.SIGTERM)

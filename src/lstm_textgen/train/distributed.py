"""Data-parallel training on PyTorch's own engine: which process this is, the few collectives the
training loop needs, and a launcher for local worker processes.

A process started by torchrun (or by `launch_local`, which uses torchrun's launcher API) finds
RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous in its environment; `World.from_env` reads them, so
a hand-started `torchrun ... stages/train.py` needs no extra flags. Without them the process is a
world of one and every collective below is the identity: single-process training runs no
distributed code at all.

Backends: NCCL on CUDA (one GPU per process, picked by LOCAL_RANK), gloo on the CPU.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lstm_textgen.devices import resolve_device
from lstm_textgen.errors import Terminated, UserError, shutting_down

# A rank that waits longer than this in a collective gives up (a peer died or hangs).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


class DistributedError(UserError):
    """A worker process failed; the message names the rank and points at its error."""


class PeerLostError(DistributedError):
    """A collective failed because another rank died: every surviving rank sees it, rank 0 says it."""

    every_rank = True
    exit_code = 75  # EX_TEMPFAIL: a consequence, so the launcher names another rank as the cause


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 when not launched)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # started by torchrun: a process group (and DDP) even for one process

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        return cls(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            launched=True,
        )

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes outputs and checkpoints, and evaluates."""
        return self.rank == 0

    def device(self, preference: str) -> torch.device:
        """`train.device` for this process: on CUDA the GPU of its local rank."""
        device = resolve_device(preference)
        if device.type == "cuda" and self.launched:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def threads(self, configured: int | None) -> int:
        """CPU threads per process: `train.threads`, else the cores shared by the local processes."""
        return configured or max(1, (os.cpu_count() or 1) // self.local_world_size)

    def backend(self, device: torch.device) -> str:
        return "nccl" if device.type == "cuda" else "gloo"

    def start(self, device: torch.device) -> None:
        if self.launched and not dist.is_initialized():
            die_with_parent()
            # NCCL: a collective that fails or outlasts the timeout (a dead peer on another machine)
            # raises in this process instead of hanging; on one machine torchrun stops the others first
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            dist.init_process_group(self.backend(device), timeout=COLLECTIVE_TIMEOUT)

    def stop(self) -> None:
        if self.launched and dist.is_initialized():
            dist.destroy_process_group()

    @contextmanager
    def running(self, preference: str) -> Iterator[torch.device]:
        """This process's device (`train.device`), with the process group started when launched and
        stopped on the way out, and a peer's failure named (`peers_watched`)."""
        device = self.device(preference)
        self.start(device)
        try:
            with self.peers_watched():
                yield device
        finally:
            self.stop()

    @contextmanager
    def peers_watched(self) -> Iterator[None]:
        """A collective that fails because a peer died (gloo's "Connection reset by peer", NCCL's
        errors) becomes one PeerLostError instead of a traceback on every surviving rank."""
        try:
            yield
        except RuntimeError as exc:
            if not (self.launched and peer_lost(exc)):
                raise
            shutting_down()
            raise PeerLostError(
                f"rank {self.rank} lost contact with another training process, which failed or was "
                f"killed (its error, if any, is printed by its rank): {str(exc).splitlines()[0][:200]}"
            ) from None

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DistributedDataParallel when launched (it averages gradients in backward), else the model."""
        if not self.launched:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: every rank ends with the sum over ranks."""
        if self.launched:
            dist.all_reduce(tensor)
        return tensor

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a decision taken once and shared)."""
        if not self.launched:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.launched:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


def peer_lost(exc: BaseException) -> bool:
    """A collective failed because another process went away (gloo's "Connection reset/closed by
    peer", NCCL's errors)."""
    return isinstance(exc, dist.DistError) or any(
        word in str(exc) for word in ("gloo", "NCCL", "Connection reset", "Connection closed")
    )


def root_failure(exit_codes: dict[int, int]) -> tuple[int, int]:
    """The rank whose failure caused the others: not one that only lost its peers or was stopped
    by torchrun (torchrun's timestamps have a resolution of a second, too coarse to tell)."""
    consequences = {PeerLostError.exit_code, 128 + signal.SIGTERM}
    rank = min(exit_codes, key=lambda r: (exit_codes[r] in consequences, r))
    return rank, exit_codes[rank]


def die_with_parent() -> None:
    """Linux: this worker gets SIGTERM when the process that started it (torchrun's agent, or the
    train stage launching its workers) dies, even by SIGKILL, so no worker is left orphaned."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def check_processes(processes: int, device: torch.device) -> None:
    """One GPU per process: more processes than GPUs is refused before any starts."""
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise DistributedError(
            f"train.processes: {processes} processes need {processes} GPUs (one each), this machine has "
            f"{torch.cuda.device_count()}; lower train.processes"
        )


def launch_local(processes: int, script: list[str], device_preference: str = "auto") -> None:
    """Run `python *script` as `processes` workers on this machine through torchrun's launcher API
    (c10d rendezvous on a free local port, no restarts). If one worker fails, torchrun stops the
    others; this then raises one DistributedError naming the first rank that failed."""
    check_processes(processes, resolve_device(device_preference))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
    )
    try:
        elastic_launch(config, sys.executable)(*script)
    except ChildFailedError as failed:
        rank, code = root_failure({rank: f.exitcode for rank, f in failed.failures.items()})
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise DistributedError(
            f"training on {processes} processes failed: rank {rank} {how} first (its error, if it "
            "printed one, is above); the other workers were stopped"
        ) from None
    except SignalException as signalled:  # Ctrl-C or SIGTERM reached the launcher: workers stopped
        if signalled.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise Terminated(f"stopped by signal {signalled.sigval.name}; the workers were stopped") from None

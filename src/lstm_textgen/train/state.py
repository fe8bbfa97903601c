"""Everything that changes while training, and its one checkpoint form.

`TrainState` speaks `state_dict` / `load_state_dict` as PyTorch's stateful objects do; they are the
only places that name the resumable checkpoint's keys (what the run was, params, vocabulary, device,
dtype, is added beside them; the Checkpointer writes and checks the file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lstm_textgen.model.recurrent import RecurrentLM, State
from lstm_textgen.train.batches import WindowBatcher
from lstm_textgen.train.distributed import World

Weights = dict[str, torch.Tensor]


def state_tensors(state: State | None) -> list[torch.Tensor]:
    """A recurrent state (LSTM (h, c), GRU/RNN h, or none) as the list a checkpoint holds."""
    if state is None:
        return []
    return list(state) if isinstance(state, tuple) else [state]


@dataclass
class LossWindow:
    """Training loss and tokens since the last evaluation, summed on the device (no sync per step)."""

    started_s: float = 0.0  # training seconds at the window's start
    loss_sum: torch.Tensor | None = None  # this rank's
    steps: int = 0
    tokens: int = 0  # every rank's

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def mean(self, world: World) -> float:
        """Mean training loss of the window over every rank's windows (a collective)."""
        if self.loss_sum is None:
            return math.nan
        return world.sum(self.loss_sum.float().reshape(1)).item() / (self.steps * world.world_size)


@dataclass
class TrainState:
    """Model, optimizer, gradient scaler and batcher, plus the loop's counters. The best weights so far
    ride along (on the CPU) so that a resumed run can restore the best checkpoint."""

    model: RecurrentLM
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batcher: WindowBatcher
    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    warmup_s: float | None = None  # training seconds when warm-up ended (None: still warming up)
    carried: State | None = None  # the recurrent state carried across windows (train.stateful)
    best_weights: Weights | None = None
    window: LossWindow = field(default_factory=LossWindow)

    def record_evaluation(self, val_loss: float) -> bool:
        """Count an evaluation; True when it is the best so far (its weights are then kept)."""
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_step, self.bad_evals = val_loss, self.step, 0
            self.best_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
            return True
        self.bad_evals += 1
        return False

    def rank_part(self) -> dict[str, Any]:
        """What differs between the ranks of a distributed run, on the CPU, for rank 0 to save: torch's
        RNGs (dropout masks; CUDA's own on a GPU) and the carried state of this rank's streams."""
        device = next(self.model.parameters()).device
        return {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "carried": [t.detach().cpu() for t in state_tensors(self.carried)],
            "window_loss": None if self.window.loss_sum is None else self.window.loss_sum.detach().cpu(),
        }

    def state_dict(self, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The resumable checkpoint; `ranks` holds every rank's `rank_part` (this process's alone when
        None). Carried states are joined along the batch: one global batch, whatever the world size."""
        ranks = ranks or [self.rank_part()]
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "warmup_train_seconds": self.warmup_s,
            "rng": {
                "batches": self.batcher.generator.get_state(),  # the same on every rank
                "ranks": [part["torch_rng"] for part in ranks],
                "cuda_ranks": [part["cuda_rng"] for part in ranks],
            },
            "world_size": len(ranks),
            "batcher_position": self.batcher.position,
            "carried_state": [
                torch.cat(layer, dim=1) for layer in zip(*(part["carried"] for part in ranks), strict=True)
            ],
            "best_model": self.best_weights,
            "window": {
                "started_s": self.window.started_s,
                "steps": self.window.steps,
                "tokens": self.window.tokens,
                "loss_sums": [part["window_loss"] for part in ranks],
            },
        }

    def load_state_dict(self, saved: dict[str, Any], rank: int = 0) -> None:
        """Continue from a checkpoint written by `state_dict`: the same steps follow as if the run
        had never stopped, as long as the global batch (processes x batch size) is the one saved. With
        another, the run continues (weights, optimizer, step, schedule, history) but draws other
        windows; stateful streams then start from a zero state, and ranks beyond the saved ones keep
        their fresh seeds."""
        device = next(self.model.parameters()).device
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved["grad_scaler"]:  # empty when saved unscaled: a resume may change train.dtype
            self.scaler.load_state_dict(saved["grad_scaler"])
        self.step, self.best_val_loss, self.best_step = (
            saved["step"],
            saved["best_val_loss"],
            saved["best_step"],
        )
        self.bad_evals, self.history = saved["bad_evals"], saved["history"]
        self.train_seconds = saved["train_seconds"]
        self.warmup_s = saved["warmup_train_seconds"]
        self.batcher.generator.set_state(saved["rng"]["batches"])
        rank_rngs = saved["rng"]["ranks"]
        if rank < len(rank_rngs):
            torch.set_rng_state(rank_rngs[rank])
        cuda_rngs = saved["rng"]["cuda_ranks"]
        if device.type == "cuda" and rank < len(cuda_rngs) and cuda_rngs[rank] is not None:
            torch.cuda.set_rng_state(cuda_rngs[rank], device)
        self.batcher.position = saved["batcher_position"]
        carried = [  # float32: the run may go on in another precision (train.dtype may change)
            t[:, self.batcher.rank_rows].to(device, torch.float32)
            for t in saved["carried_state"]
            if t.shape[1] == self.batcher.global_batch
        ]
        self.carried = None if not carried else tuple(carried) if len(carried) == 2 else carried[0]  # type: ignore[assignment]
        self.best_weights = saved["best_model"]
        window = saved["window"]
        sums = window["loss_sums"]
        loss_sum = sums[rank] if rank < len(sums) else None
        self.window = LossWindow(
            started_s=window["started_s"],
            loss_sum=None if loss_sum is None else loss_sum.to(device),
            steps=window["steps"] if loss_sum is not None else 0,
            tokens=window["tokens"] if loss_sum is not None else 0,
        )

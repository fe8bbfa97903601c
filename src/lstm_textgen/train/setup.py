"""What a training starts from and ends with: `TrainSetup` (the resolved device, dtype, batcher and
checkpointer), `TrainResult`, the optimizer and the train state of a new run, and `Compiled`
(torch.compile, falling back to eager where it cannot)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.devices import (
    dtype_name,
    needs_loss_scaling,
    recurrent_dtype,
    token_source,
)
from lstm_textgen.errors import UserError
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.params import Params, TrainParams
from lstm_textgen.train.batches import WindowBatcher
from lstm_textgen.train.checkpointer import Checkpointer
from lstm_textgen.train.distributed import World
from lstm_textgen.train.state import TrainState

Stopped = Literal["max_steps", "max_minutes", "early_stopping", "requested"]
# Called after each evaluation with its record; returning True asks the loop to stop there.
EvalCallback = Callable[[dict[str, Any]], bool | None]


class TrainingError(UserError):
    """Training diverged or cannot start; the message says what to change."""


class DivergedError(TrainingError):
    """The (rank-averaged) loss blew up: every rank raises it at the same step."""

    every_rank = True


@dataclass(frozen=True)
class TrainSetup:
    """What stays fixed during a run: the params, where it runs, the validation data, the files."""

    params: Params
    vocab: Vocabulary
    device: torch.device
    dtype: torch.dtype
    val_tokens: torch.Tensor
    checkpointer: Checkpointer
    world: World = field(default_factory=World)
    labels: dict[str, str] = field(default_factory=dict)  # e.g. the MLflow run id, kept in checkpoints
    recurrent: torch.dtype = torch.float32  # what the recurrent layers run in (`recurrent_dtype`)

    def global_batch(self) -> int:
        """Windows of one step, every process's together."""
        return self.params.train.batch_size * self.world.world_size

    def val_windows(self) -> int:
        """Evenly spaced validation windows; never more than it takes to cover the split once."""
        seq_len, tp = self.params.data.seq_len, self.params.train
        return min(tp.eval_batches * self.global_batch(), math.ceil((len(self.val_tokens) - 1) / seq_len))

    def run_info(self) -> dict[str, Any]:
        """The checkpoint's description of the run, beside the `TrainState`."""
        return {
            "params": self.params.model_dump(),
            "vocab": self.vocab.to_dict(),
            "device": self.device.type,
            "dtype": dtype_name(self.dtype),
            "labels": self.labels,
        }

    def tokens_per_step(self) -> int:
        return self.global_batch() * self.params.data.seq_len


@dataclass
class TrainResult:
    """What a run reached. The `window_val_loss_*` figures are the periodic estimate (evenly spaced
    `data.seq_len` windows, each from a zero state), not the evaluate stage's whole-split figures."""

    window_val_loss_best: float
    best_step: int
    window_val_loss_last: float
    train_loss_last: float
    steps: int
    tokens_per_sec: float
    train_seconds: float
    device: str
    dtype: str
    recurrent_dtype: str  # what the LSTM/GRU/RNN ran in (CUDA's autocast: float16 under bf16)
    processes: int
    parameters: int
    stopped: Stopped
    history: list[dict[str, float]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "history"}

    def precision(self) -> str:
        """The autocast dtype, and the recurrent layers' where they ran in another."""
        other = self.recurrent_dtype != self.dtype and self.dtype != "float32"
        return f"{self.dtype}, recurrent layers {self.recurrent_dtype}" if other else self.dtype

    def summary(self) -> str:
        processes = f" x {self.processes} processes" if self.processes > 1 else ""
        return (
            f"best periodic val loss {self.window_val_loss_best:.4f} at step {self.best_step}, "
            f"{self.tokens_per_sec:,.0f} tokens/s on {self.device}{processes} ({self.precision()}), "
            f"{self.train_seconds:.0f} s"
        )


def make_optimizer(model: torch.nn.Module, train: TrainParams) -> torch.optim.AdamW:
    """AdamW as `train.*` configures it, with the fused kernel where PyTorch has one (CPU, CUDA)."""
    device_type = next(model.parameters()).device.type
    return torch.optim.AdamW(
        model.parameters(),
        lr=train.lr,
        weight_decay=train.weight_decay,
        betas=(train.beta1, train.beta2),
        fused=device_type in ("cpu", "cuda"),
    )


def new_train_state(
    train_ids: np.ndarray,
    vocab_size: int,
    params: Params,
    *,
    device: torch.device,
    dtype: torch.dtype,
    world: World | None = None,
    initial_weights: dict[str, torch.Tensor] | None = None,
    recurrent: torch.dtype | None = None,
) -> TrainState:
    """A fresh state: seeds set first, so the same params give the same weights and batches. Every
    rank builds the same weights and draws from the same window generator (its slice of each global
    batch); dropout masks differ by rank (seed + rank), rank 0's being a single process's.
    `initial_weights` (fine-tuning) replace the random ones. `recurrent`: the dtype the recurrent
    layers run in (measured here when not given), which decides loss scaling."""
    tp, world = params.train, world or World()
    torch.manual_seed(tp.seed)
    generator = torch.Generator().manual_seed(tp.seed)
    model = RecurrentLM(vocab_size, params.model).to(device)
    if initial_weights is not None:
        model.load_state_dict(initial_weights)
    if world.rank > 0:
        torch.manual_seed(tp.seed + world.rank)
    tokens = token_source(train_ids, device)
    batcher = WindowBatcher(
        tokens,
        params.data.seq_len,
        tp.batch_size,
        stateful=tp.stateful,
        generator=generator,
        rank=world.rank,
        world_size=world.world_size,
        device=device,
    )
    recurrent = recurrent or recurrent_dtype(device, dtype, params.model.cell)
    scaling = needs_loss_scaling(dtype, recurrent)
    return TrainState(
        model=model,
        optimizer=make_optimizer(model, tp),
        scaler=torch.amp.GradScaler(device.type, enabled=scaling),
        batcher=batcher,
    )


class Compiled:
    """`torch.compile`d forward, or the plain module with a warning if compiling fails at the first
    call (no C compiler, an unsupported platform): `train.compile` is an experiment, never a reason to
    fail. After a first call that worked, errors propagate as usual."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.compiled, self.checked = module, torch.compile(module), False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.checked:
            return self.compiled(*args, **kwargs)
        try:
            result = self.compiled(*args, **kwargs)
        except Exception as exc:  # torch raises many kinds here; nothing has changed state yet
            warnings.warn(f"train.compile: torch.compile failed ({exc}); training without it", stacklevel=2)
            self.compiled = self.module
            result = self.module(*args, **kwargs)
        self.checked = True
        return result

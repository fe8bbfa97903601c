"""The training loop, assembled from small parts: a `TrainState` (train_state.py) that checkpoints
itself, one `train_step` (shared with the benchmark), one `evaluate_and_checkpoint`, a `Clock` for the
minutes budget (schedule.py) and a stop decision.

Knows nothing of DVC or MLflow: progress goes out through the `on_eval` callback, which may also ask
the loop to stop. Where data-parallel training would plug in is marked `distributed:`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lstm_textgen.batches import Batcher
from lstm_textgen.checkpoint import load_checkpoint, save_checkpoint
from lstm_textgen.devices import (
    autocast,
    configure_backend,
    dtype_name,
    resolve_device,
    resolve_dtype,
    to_device_tokens,
)
from lstm_textgen.errors import UserError
from lstm_textgen.evaluation import periodic_validation_loss
from lstm_textgen.model import RecurrentLM, count_parameters, detach_state
from lstm_textgen.params import Params, TrainParams
from lstm_textgen.schedule import Clock, lr_at
from lstm_textgen.train_state import TrainState
from lstm_textgen.vocab import Vocabulary
from lstm_textgen.windows import check_fits

Stopped = Literal["max_steps", "max_minutes", "early_stopping", "requested"]
# Called after each evaluation with its record; returning True asks the loop to stop there.
EvalCallback = Callable[[dict[str, Any]], bool | None]


class TrainingError(UserError):
    """Training diverged or cannot start; the message says what to change."""


@dataclass(frozen=True)
class TrainSetup:
    """What stays fixed during a run: the params, where it runs, the validation data, the files."""

    params: Params
    vocab: Vocabulary
    device: torch.device
    dtype: torch.dtype
    val_tokens: torch.Tensor
    best_path: Path
    last_path: Path
    # distributed: rank and world size join here; only rank 0 writes checkpoints

    def val_windows(self) -> int:
        """Evenly spaced validation windows; never more than it takes to cover the split once."""
        seq_len, tp = self.params.data.seq_len, self.params.train
        return min(tp.eval_batches * tp.batch_size, math.ceil((len(self.val_tokens) - 1) / seq_len))

    def run_info(self) -> dict[str, Any]:
        """The checkpoint's description of the run, beside the `TrainState`."""
        return {
            "params": self.params.model_dump(),
            "vocab": self.vocab.to_dict(),
            "device": self.device.type,
            "dtype": dtype_name(self.dtype),
        }


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
    parameters: int
    stopped: Stopped
    history: list[dict[str, float]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "history"}


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
    train_ids: np.ndarray, vocab_size: int, params: Params, device: torch.device, dtype: torch.dtype
) -> TrainState:
    """A fresh state: seeds set first, so the same params give the same weights and batches."""
    tp = params.train
    torch.manual_seed(tp.seed)
    generator = torch.Generator().manual_seed(tp.seed)  # distributed: seed + rank
    model = RecurrentLM(vocab_size, params.model).to(device)
    tokens = to_device_tokens(train_ids, device)
    return TrainState(
        model=model,
        optimizer=make_optimizer(model, tp),
        # fp16 autocast needs loss scaling, or small gradients underflow to zero; off otherwise
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        batcher=Batcher(tokens, params.data.seq_len, tp.batch_size, tp.stateful, generator),
    )


def train_step(
    state: TrainState,
    forward: Callable[..., Any],
    lr: float,
    tp: TrainParams,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One update on the next batch; returns the (detached) loss. `forward` is the model, or its
    compiled or DistributedDataParallel wrapper (distributed: DDP averages the gradients here)."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    chunk, reset = state.batcher.next()
    inputs = chunk[:, :-1]
    targets = chunk[:, -1] if tp.last_only else chunk[:, 1:]
    carried = None if (reset or state.carried is None) else detach_state(state.carried)
    with autocast(chunk.device, dtype):
        logits, new_state = forward(inputs, carried if tp.stateful else None, last_only=tp.last_only)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if tp.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), tp.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.carried = new_state if tp.stateful else None
    state.step += 1
    return loss.detach()


def check_divergence(loss: float, state: TrainState, lr: float, tp: TrainParams, vocab_size: int) -> None:
    """NaN, or far above the loss of a uniform guess: stop with the step and what to change."""
    if not math.isfinite(loss) or loss > 4 * math.log(vocab_size) + 10:
        raise TrainingError(
            f"training diverged: loss {loss:.4g} at step {state.step} (lr {lr:.3g}); "
            f"lower train.lr (now {tp.lr:g}) or keep train.grad_clip > 0"
        )


@dataclass
class LossWindow:
    """Training loss and tokens since the last evaluation, summed on the device (no sync per step)."""

    started_s: float = 0.0  # training seconds at the window's start
    loss_sum: torch.Tensor | None = None
    steps: int = 0
    tokens: int = 0

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def mean(self) -> float:
        return (self.loss_sum / self.steps).item() if self.loss_sum is not None else math.nan


def evaluate_and_checkpoint(
    state: TrainState, setup: TrainSetup, window: LossWindow, clock: Clock, lr: float
) -> dict[str, float]:
    """The periodic evaluation: validation loss, a history record, the best and last checkpoints."""
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    clock.pause()
    state.train_seconds, state.warmup_s = clock.trained_s(), clock.warmup_s
    window_s = state.train_seconds - window.started_s
    tp, seq_len = setup.params.train, setup.params.data.seq_len
    val = periodic_validation_loss(
        state.model,
        setup.val_tokens,
        seq_len,
        setup.val_windows(),
        tp.batch_size,
        tp.last_only,
        setup.dtype,
    )
    record = {
        "step": state.step,
        "train_loss": window.mean(),
        "val_loss": val,
        "val_perplexity": math.exp(min(val, 50.0)),
        "val_bits_per_token": val / math.log(2),
        "lr": lr,
        "tokens_per_sec": window.tokens / max(window_s, 1e-9),
        "train_seconds": state.train_seconds,
    }
    state.history.append(record)
    # distributed: rank 0 alone writes
    if state.record_evaluation(val):
        save_checkpoint(setup.best_path, {**state.to_checkpoint(), **setup.run_info(), "best_model": None})
    save_checkpoint(setup.last_path, {**state.to_checkpoint(), **setup.run_info()})
    return record


def stop_reason(state: TrainState, tp: TrainParams, out_of_time: bool, asked: bool) -> Stopped | None:
    """Why to stop after this evaluation, if at all (distributed: decided once, shared by all ranks)."""
    if out_of_time:
        return "max_minutes"
    if tp.patience is not None and state.bad_evals >= tp.patience:
        return "early_stopping"
    if asked:
        return "requested"
    return None


def resume_from(state: TrainState, setup: TrainSetup) -> None:
    """Continue from the last checkpoint; restore the best one too, as DVC deletes stage outputs
    before a run."""
    saved = load_checkpoint(setup.last_path)
    state.restore(saved)
    if not setup.best_path.is_file():
        save_checkpoint(setup.best_path, {**saved, "model": saved["best_model"], "best_model": None})
    print(f"train: resumed from {setup.last_path} at step {state.step}")


def train(
    splits: dict[str, np.ndarray],
    vocab: Vocabulary,
    params: Params,
    best_path: Path,
    last_path: Path,
    on_eval: EvalCallback | None = None,
) -> TrainResult:
    """Train per `params`; keep the best checkpoint (by validation loss) at `best_path` and the
    resumable latest at `last_path`."""
    tp, seq_len = params.train, params.data.seq_len
    check_fits(len(splits["train"]), seq_len, "train")
    check_fits(len(splits["val"]), seq_len, "val")
    device = resolve_device(tp.device)
    dtype = resolve_dtype(tp.dtype, device, params.model.cell)
    configure_backend(device, tp.threads)
    state = new_train_state(splits["train"], len(vocab), params, device, dtype)
    val_tokens = to_device_tokens(splits["val"], device)
    setup = TrainSetup(params, vocab, device, dtype, val_tokens, best_path, last_path)
    forward = torch.compile(state.model) if tp.compile else state.model  # distributed: wrap in DDP
    if tp.resume and last_path.is_file():
        resume_from(state, setup)

    clock = Clock.for_minutes(tp.max_minutes, state.train_seconds, state.warmup_s)
    window = LossWindow(started_s=state.train_seconds)
    stopped: Stopped = "max_steps"
    bar = tqdm(
        total=tp.max_steps, initial=state.step, desc="train", unit="step", disable=None, dynamic_ncols=True
    )
    state.model.train()
    while state.step < tp.max_steps:
        clock.mark_warmup_end(state.step, tp.warmup_steps)
        lr = lr_at(state.step, tp, clock.progress())
        loss = train_step(state, forward, lr, tp, dtype)
        window.add(loss, tp.batch_size * seq_len)
        if device.type == "cpu" or state.step % 50 == 0:  # .item() waits for the device: not every step
            value = loss.item()
            check_divergence(value, state, lr, tp, len(vocab))
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        bar.update(1)

        out_of_time = clock.out_of_time()
        if state.step % tp.eval_every == 0 or state.step == tp.max_steps or out_of_time:
            record = evaluate_and_checkpoint(state, setup, window, clock, lr)
            bar.write(
                f"step {state.step}: train {record['train_loss']:.4f}, val {record['val_loss']:.4f}, "
                f"{record['tokens_per_sec']:,.0f} tokens/s, {state.train_seconds:.0f} s"
            )
            asked = bool(on_eval(record)) if on_eval is not None else False
            clock.resume()
            window = LossWindow(started_s=state.train_seconds)
            reason = stop_reason(state, tp, out_of_time, asked)
            if reason is not None:
                stopped = reason
                break
    bar.close()
    return result_of(state, setup, stopped)


def result_of(state: TrainState, setup: TrainSetup, stopped: Stopped) -> TrainResult:
    if not state.history:
        raise TrainingError(
            f"train.max_steps: nothing to do, the checkpoint at {setup.last_path} is at step {state.step}"
        )
    tp, last = setup.params.train, state.history[-1]
    return TrainResult(
        window_val_loss_best=state.best_val_loss,
        best_step=state.best_step,
        window_val_loss_last=last["val_loss"],
        train_loss_last=last["train_loss"],
        steps=state.step,
        tokens_per_sec=state.step
        * tp.batch_size
        * setup.params.data.seq_len
        / max(state.train_seconds, 1e-9),
        train_seconds=state.train_seconds,
        device=setup.device.type,
        dtype=dtype_name(setup.dtype),
        parameters=count_parameters(state.model),
        stopped=stopped,
        history=state.history,
    )

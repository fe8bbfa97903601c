"""The training loop: random windows (or stateful streams) drawn by indexing a token tensor that lives
on the device, AdamW with warm-up + cosine decay, gradient clipping, bf16 autocast where the hardware
has it, periodic validation, early stopping, best and last checkpoints, exact resume.

Knows nothing of DVC or MLflow: progress goes out through the `on_eval` callback.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lstm_textgen.checkpoint import load_checkpoint, save_checkpoint
from lstm_textgen.errors import UserError
from lstm_textgen.model import RecurrentLM, State, count_parameters, detach_state
from lstm_textgen.params import Params, TrainParams
from lstm_textgen.vocab import Vocabulary
from lstm_textgen.windows import check_fits

EvalCallback = Callable[[dict[str, Any]], None]


class TrainingError(UserError):
    """Training diverged or cannot start; the message says what to change."""


# --------------------------------------------------------------------------------------------------
# Device, precision, schedule


def resolve_device(preference: str) -> torch.device:
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device: cuda requested but no CUDA device is available (use auto or cpu)")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("train.device: mps requested but Apple MPS is not available (use auto or cpu)")
    return torch.device(preference)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 autocast made LSTM training about 2x faster on CPU."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_dtype(preference: str, device: torch.device, cell: str = "lstm") -> torch.dtype:
    """Autocast dtype: bf16 where the device runs it natively, else float32. An explicit reduced
    precision on the CPU is tried once on a tiny `cell` first: oneDNN has no bf16/fp16 LSTM on CPUs
    without AVX-512 and fails deep inside the first forward pass with an opaque message."""
    if preference != "auto":
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[preference]
        if device.type == "cpu" and dtype != torch.float32:
            _check_cpu_autocast(dtype, cell, preference)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _check_cpu_autocast(dtype: torch.dtype, cell: str, name: str) -> None:
    from lstm_textgen.model import CELLS

    probe = CELLS[cell](4, 8, num_layers=2, batch_first=True)
    try:
        with torch.autocast(device_type="cpu", dtype=dtype):
            outputs, _ = probe(torch.zeros(1, 2, 4, requires_grad=True))
        outputs.float().sum().backward()
    except RuntimeError as error:
        raise TrainingError(
            f"train.dtype: {name} does not run a {cell.upper()} on this CPU "
            f"(native bf16: {cpu_has_native_bf16()}; PyTorch said: {str(error).splitlines()[0][:120]}); "
            "use train.dtype auto or float32"
        ) from None


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_at(step: int, train: TrainParams, clock_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (or constant). The decay follows
    whichever budget runs out first: the steps after warm-up towards max_steps, or `clock_progress`,
    the share of max_minutes left after warm-up that has been spent, so a run stopped by the clock
    still ends at the low learning rate, on any machine, with the same shape as a run of steps."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return train.lr
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, max((step - train.warmup_steps) / span, clock_progress))
    floor = train.lr * train.min_lr_ratio
    return floor + 0.5 * (train.lr - floor) * (1 + math.cos(math.pi * progress))


def progress_by_clock(trained_s: float, warmup_s: float | None, budget_s: float) -> float:
    """Share of the clock budget left after warm-up that has been spent (0 during warm-up or without a
    budget): the cosine spans the time after warm-up as it spans the steps after it."""
    if warmup_s is None or budget_s == math.inf:
        return 0.0
    return (trained_s - warmup_s) / max(budget_s - warmup_s, 1e-9)


def make_optimizer(model: torch.nn.Module, train: TrainParams) -> torch.optim.AdamW:
    """AdamW as `train.*` configures it; the training loop and the benchmark share it so they cannot drift.
    The fused kernel where PyTorch has one (CPU, CUDA): on two CPU cores it took the clipped update of
    the default model from 4.4 to 2.6 ms, about 3% of a training step."""
    device_type = next(model.parameters()).device.type
    return torch.optim.AdamW(
        model.parameters(),
        lr=train.lr,
        weight_decay=train.weight_decay,
        betas=(train.beta1, train.beta2),
        fused=device_type in ("cpu", "cuda"),
    )


# --------------------------------------------------------------------------------------------------
# Batches


def to_device_tokens(ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """Move a split to the device once; uint8 stays uint8, wider ids become int32."""
    dtype = np.uint8 if ids.dtype == np.uint8 else np.int32
    return torch.from_numpy(np.array(ids, dtype=dtype, copy=True)).to(device)


class Batcher:
    """Training batches by indexing the device tensor: no per-sample Python, no host copies.

    Stateless: `batch_size` windows at random offsets. Stateful: `batch_size` parallel streams over
    contiguous stretches of the text, windows read in order, state reset when a stream wraps around.
    """

    def __init__(
        self, tokens: torch.Tensor, seq_len: int, batch_size: int, stateful: bool, generator: torch.Generator
    ) -> None:
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.stateful, self.generator = stateful, generator
        self.offsets = torch.arange(seq_len + 1, device=tokens.device)
        self.stream_len = len(tokens) // batch_size
        self.windows_per_stream = (self.stream_len - 1) // seq_len
        if stateful and self.windows_per_stream < 1:
            raise TrainingError(
                f"train.stateful: {batch_size} streams of {self.stream_len} tokens hold no window of "
                f"data.seq_len {seq_len}; lower train.batch_size or data.seq_len"
            )
        self.position = 0

    def next(self) -> tuple[torch.Tensor, bool]:
        """[B, seq_len + 1] token ids (inputs are [:, :-1], targets [:, 1:]) and whether state resets."""
        if self.stateful:
            k = self.position % self.windows_per_stream
            starts = torch.arange(self.batch_size) * self.stream_len + k * self.seq_len
            reset = k == 0
        else:
            starts = torch.randint(
                0, len(self.tokens) - self.seq_len, (self.batch_size,), generator=self.generator
            )
            reset = True
        self.position += 1
        return self.tokens[starts.to(self.tokens.device)[:, None] + self.offsets].long(), reset


# --------------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validation_loss(
    model: RecurrentLM,
    tokens: torch.Tensor,
    seq_len: int,
    num_windows: int,
    batch_size: int,
    last_only: bool,
    dtype: torch.dtype,
) -> float:
    """Mean loss (nats/token) over `num_windows` evenly spaced windows, each from a zero state:
    the same windows at every evaluation, so the curve is smooth and comparable."""
    was_training = model.training
    model.eval()
    offsets = torch.arange(seq_len + 1, device=tokens.device)
    all_starts = torch.linspace(0, len(tokens) - seq_len - 1, num_windows).long().to(tokens.device)
    total, count = 0.0, 0
    for starts in all_starts.split(batch_size):
        chunk = tokens[starts[:, None] + offsets].long()
        with autocast(tokens.device, dtype):
            logits, _ = model(chunk[:, :-1], last_only=last_only)
        targets = chunk[:, -1] if last_only else chunk[:, 1:]
        total += F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    model.train(was_training)
    return total / count


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    best_val_loss: float
    best_step: int
    final_val_loss: float
    final_train_loss: float
    steps: int
    tokens_per_sec: float
    train_seconds: float
    device: str
    dtype: str
    parameters: int
    stopped: str
    history: list[dict[str, float]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "history"}


def train(
    splits: dict[str, np.ndarray],
    vocab: Vocabulary,
    params: Params,
    best_path: Path,
    last_path: Path,
    on_eval: EvalCallback | None = None,
    halt_at_step: int | None = None,
) -> TrainResult:
    """Train per `params`; keep the best checkpoint (by validation loss) at `best_path` and the
    resumable latest at `last_path`. `halt_at_step` simulates an interruption (tests)."""
    tp, seq_len = params.train, params.data.seq_len
    check_fits(len(splits["train"]), seq_len, "train")
    check_fits(len(splits["val"]), seq_len, "val")
    device = resolve_device(tp.device)
    dtype = resolve_dtype(tp.dtype, device, params.model.cell)
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cpu":
        torch.set_num_threads(tp.threads or os.cpu_count() or 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(tp.seed)
    generator = torch.Generator().manual_seed(tp.seed)

    model = RecurrentLM(len(vocab), params.model).to(device)
    optimizer = make_optimizer(model, tp)
    train_tokens = to_device_tokens(splits["train"], device)
    val_tokens = to_device_tokens(splits["val"], device)
    batcher = Batcher(train_tokens, seq_len, tp.batch_size, tp.stateful, generator)
    # evenly spaced validation windows; never more than it takes to cover the split once
    val_windows = min(tp.eval_batches * tp.batch_size, math.ceil((len(val_tokens) - 1) / seq_len))
    last_only = tp.objective == "last"
    forward = torch.compile(model) if tp.compile else model

    step, best_val, best_step, bad_evals = 0, math.inf, 0, 0
    state: State | None = None  # carried across windows when train.stateful
    history: list[dict[str, float]] = []
    elapsed_train = 0.0
    best_state: dict[str, torch.Tensor] | None = None  # kept in the last checkpoint for resume
    warmup_s: float | None = None  # training seconds when warm-up ended: where the clock's cosine starts
    if tp.resume and last_path.is_file():
        saved = load_checkpoint(last_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step, best_val, best_step = saved["step"], saved["best_val_loss"], saved["best_step"]
        bad_evals, history, elapsed_train = saved["bad_evals"], saved["history"], saved["train_seconds"]
        warmup_s = saved.get("warmup_train_seconds", 0.0)  # None: resumed during warm-up
        generator.set_state(saved["rng"]["batches"])
        torch.set_rng_state(saved["rng"]["torch"])
        batcher.position = saved["batcher_position"]
        carried = saved.get("carried_state")
        if carried:
            state = tuple(t.to(device) for t in carried) if len(carried) == 2 else carried[0].to(device)
        best_state = saved["best_model"]
        if not best_path.is_file():  # DVC deletes stage outputs before a run; restore the best so far
            save_checkpoint(best_path, {**saved, "model": best_state, "best_model": None})
        print(f"train: resumed from {last_path} at step {step}")

    def checkpoint_dict() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "best_val_loss": best_val,
            "best_step": best_step,
            "bad_evals": bad_evals,
            "history": history,
            "train_seconds": elapsed_train,
            "warmup_train_seconds": warmup_s,
            "rng": {"batches": generator.get_state(), "torch": torch.get_rng_state()},
            "batcher_position": batcher.position,
            "carried_state": [] if state is None else list(state) if isinstance(state, tuple) else [state],
            "params": params.model_dump(),
            "vocab": vocab.to_dict(),
            "device": device.type,
            "dtype": dtype_name,
        }

    explode_at = 4 * math.log(len(vocab)) + 10
    # the clock budget counts training (also before a resume), not evaluations
    started, evaluating_s, trained_before = time.monotonic(), 0.0, elapsed_train
    budget_s = tp.max_minutes * 60 if tp.max_minutes else math.inf

    def trained_s() -> float:
        return trained_before + time.monotonic() - started - evaluating_s

    loss_sum = torch.zeros((), device=device)
    loss_steps, tokens_since, stopped = 0, 0, "max_steps"
    window_start = time.perf_counter()
    bar = tqdm(total=tp.max_steps, initial=step, desc="train", unit="step", disable=None, dynamic_ncols=True)
    model.train()
    while step < tp.max_steps:
        if warmup_s is None and step >= tp.warmup_steps:
            warmup_s = trained_s()
        lr = lr_at(step, tp, progress_by_clock(trained_s(), warmup_s, budget_s))
        for group in optimizer.param_groups:
            group["lr"] = lr
        chunk, reset = batcher.next()
        inputs = chunk[:, :-1]
        targets = chunk[:, -1] if last_only else chunk[:, 1:]
        state = None if (reset or state is None) else detach_state(state)
        with autocast(device, dtype):
            logits, new_state = forward(inputs, state if tp.stateful else None, last_only=last_only)
        loss = F.cross_entropy(logits.float().reshape(-1, len(vocab)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
        optimizer.step()
        state = new_state if tp.stateful else None
        step += 1
        loss_sum += loss.detach()
        loss_steps += 1
        tokens_since += inputs.numel()
        if device.type == "cpu" or step % 50 == 0:
            value = loss.item()
            if not math.isfinite(value) or value > explode_at:
                bar.close()
                raise TrainingError(
                    f"training diverged: loss {value:.4g} at step {step} (lr {lr:.3g}); "
                    f"lower train.lr (now {tp.lr:g}) or keep train.grad_clip > 0"
                )
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        bar.update(1)

        out_of_time = trained_s() >= budget_s
        if step % tp.eval_every == 0 or step == tp.max_steps or out_of_time or step == halt_at_step:
            if device.type == "cuda":
                torch.cuda.synchronize()
            eval_start = time.monotonic()
            window_seconds = time.perf_counter() - window_start
            elapsed_train += window_seconds
            val = validation_loss(model, val_tokens, seq_len, val_windows, tp.batch_size, last_only, dtype)
            record = {
                "step": step,
                "train_loss": (loss_sum / loss_steps).item(),
                "val_loss": val,
                "val_perplexity": math.exp(min(val, 50.0)),
                "val_bits_per_token": val / math.log(2),
                "lr": lr,
                "tokens_per_sec": tokens_since / window_seconds,
                "train_seconds": elapsed_train,
            }
            history.append(record)
            bar.write(
                f"step {step}: train {record['train_loss']:.4f}, val {val:.4f}, "
                f"{record['tokens_per_sec']:,.0f} tokens/s, {elapsed_train:.0f} s"
            )
            if val < best_val:
                best_val, best_step, bad_evals = val, step, 0
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                save_checkpoint(best_path, {**checkpoint_dict(), "best_model": None})
            else:
                bad_evals += 1
            save_checkpoint(last_path, {**checkpoint_dict(), "best_model": best_state})
            if on_eval is not None:
                on_eval(record)
            evaluating_s += time.monotonic() - eval_start
            loss_sum.zero_()
            loss_steps, tokens_since = 0, 0
            if out_of_time:
                stopped = "max_minutes"
                break
            if tp.patience is not None and bad_evals >= tp.patience:
                stopped = "early_stopping"
                break
            if step == halt_at_step:
                stopped = "halted"
                break
            window_start = time.perf_counter()
    bar.close()
    if not history:
        raise TrainingError(
            f"train.max_steps: nothing to do, the checkpoint at {last_path} is at step {step}"
        )
    last = history[-1]
    return TrainResult(
        best_val_loss=best_val,
        best_step=best_step,
        final_val_loss=last["val_loss"],
        final_train_loss=last["train_loss"],
        steps=step,
        tokens_per_sec=step * tp.batch_size * seq_len / max(elapsed_train, 1e-9),
        train_seconds=elapsed_train,
        device=device.type,
        dtype=dtype_name,
        parameters=count_parameters(model),
        stopped=stopped,
        history=history,
    )

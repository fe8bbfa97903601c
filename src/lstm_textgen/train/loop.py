"""The training loop, assembled from small parts: a `TrainState` (state.py) whose `state_dict` a
`Checkpointer` (checkpointer.py) writes and resumes from, one `train_step` (shared with the benchmark),
one `evaluate_and_checkpoint`, a `Clock` for the minutes budget (schedule.py) and a stop decision.

Knows nothing of DVC or MLflow: progress goes out through the `on_eval` callback, which may also ask
the loop to stop.

Data-parallel (a `World` of several processes, distributed.py): DDP averages the gradients; the
ranks draw disjoint slices of one global batch (batches.py); what the loop decides from local
figures (the clock, the loss for the divergence check, the evaluation, the stop) is decided on
rank 0 or from the mean over ranks and shared, so every rank takes the same steps with the same
learning rate and stops at the same step. Rank 0 alone evaluates and writes checkpoints.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.data.windows import check_fits
from lstm_textgen.devices import (
    autocast,
    configure_backend,
    dtype_name,
    needs_loss_scaling,
    recurrent_dtype,
    resolve_dtype,
    to_device_tokens,
    token_source,
)
from lstm_textgen.errors import UserError
from lstm_textgen.inference.evaluation import periodic_validation_loss
from lstm_textgen.model.recurrent import RecurrentLM, count_parameters, detach_state
from lstm_textgen.params import Params, TrainParams
from lstm_textgen.train.batches import WindowBatcher
from lstm_textgen.train.checkpointer import Checkpointer
from lstm_textgen.train.distributed import World, peer_lost
from lstm_textgen.train.schedule import Clock, lr_at
from lstm_textgen.train.state import LossWindow, TrainState
from lstm_textgen.train.stopping import StopRequest, stop_requests

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


def train_step(
    state: TrainState,
    forward: Callable[..., Any],
    lr: float,
    tp: TrainParams,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One update on the next batch; returns the (detached) loss of this rank's windows. `forward` is
    the model, or its compiled or DistributedDataParallel wrapper (DDP averages the gradients over
    the ranks in `backward`, so clipping and the step see the global batch's gradient)."""
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


@dataclass(frozen=True)
class Agreed:
    """What every rank must see alike after a step: rank 0's clock and the loss averaged over ranks
    (None when the loss was not read at this step)."""

    progress: float = 0.0
    out_of_time: bool = False
    loss: float | None = None
    stop: bool = False  # a rank was asked to stop (SIGTERM, Ctrl-C)


def agree(world: World, clock: Clock, loss: torch.Tensor | None, stop: bool) -> Agreed:
    """One small all-reduce when distributed (the loss and stop requests summed, rank 0's clock
    added to zeros)."""
    if not world.launched:
        return Agreed(clock.progress(), clock.out_of_time(), None if loss is None else loss.item(), stop)
    assert loss is not None, "a distributed step always shares its loss"
    mine = [clock.progress(), float(clock.out_of_time())] if world.is_main else [0.0, 0.0]
    packed = torch.cat([loss.float().reshape(1), torch.tensor([*mine, float(stop)], device=loss.device)])
    total, progress, out_of_time, stops = world.sum(packed).tolist()
    return Agreed(progress, out_of_time > 0, total / world.world_size, stops > 0)


def check_divergence(loss: float, state: TrainState, lr: float, tp: TrainParams, vocab_size: int) -> None:
    """NaN, or far above the loss of a uniform guess: stop with the step and what to change."""
    if not math.isfinite(loss) or loss > 4 * math.log(vocab_size) + 10:
        raise DivergedError(
            f"training diverged: loss {loss:.4g} at step {state.step} (lr {lr:.3g}); "
            f"lower train.lr (now {tp.lr:g}) or keep train.grad_clip > 0"
        )


def evaluate_and_checkpoint(
    state: TrainState, setup: TrainSetup, clock: Clock, lr: float
) -> dict[str, float]:
    """The periodic evaluation: validation loss, a history record, the best and last checkpoints
    (which start a new loss window). Distributed: rank 0 evaluates (the figures equal a single
    process's) and saves every rank's RNG and carried state; the record is then shared, so every
    rank keeps the same history."""
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    clock.pause()
    state.train_seconds, state.warmup_s = clock.trained_s(), clock.warmup_s
    world, window = setup.world, state.window
    train_loss = window.mean(world)
    tokens_per_sec = window.tokens / max(state.train_seconds - window.started_s, 1e-9)
    state.window = LossWindow(started_s=state.train_seconds)
    ranks = world.gather(state.rank_part())
    record = None
    if world.is_main:
        record = validate_and_save(state, setup, {"train_loss": train_loss, "lr": lr}, tokens_per_sec, ranks)
    record = world.from_main(record)
    if not world.is_main:
        state.history.append(record)
        state.record_evaluation(record["val_loss"])
    return record


def validate_and_save(
    state: TrainState,
    setup: TrainSetup,
    training: dict[str, float],
    tokens_per_sec: float,
    ranks: list[dict[str, Any]],
) -> dict[str, float]:
    """Rank 0's part of an evaluation."""
    tp, seq_len = setup.params.train, setup.params.data.seq_len
    val = periodic_validation_loss(
        state.model,
        setup.val_tokens,
        seq_len,
        num_windows=setup.val_windows(),
        batch_size=setup.global_batch(),
        last_only=tp.last_only,
        dtype=setup.dtype,
    )
    record = {
        "step": state.step,
        "train_loss": training["train_loss"],
        "val_loss": val,
        "val_perplexity": math.exp(min(val, 50.0)),
        "val_bits_per_token": val / math.log(2),
        "lr": training["lr"],
        "tokens_per_sec": tokens_per_sec,
        "train_seconds": state.train_seconds,
    }
    state.history.append(record)
    best = state.record_evaluation(val)
    setup.checkpointer.save(state.state_dict(ranks), setup.run_info(), best)
    return record


def save_interrupted(state: TrainState, setup: TrainSetup, clock: Clock) -> None:
    """A stop was requested between evaluations: the last checkpoint at this very step, loss window
    included, so a resumed run goes on exactly as if nothing had happened."""
    clock.pause()
    state.train_seconds, state.warmup_s = clock.trained_s(), clock.warmup_s
    ranks = setup.world.gather(state.rank_part())
    if setup.world.is_main:
        setup.checkpointer.save(state.state_dict(ranks), setup.run_info(), best=False)
        last = setup.checkpointer.last_path
        print(f"train: stopped at step {state.step}; resume with train.resume=true ({last})")


def advance(
    state: TrainState,
    setup: TrainSetup,
    forward: Callable[..., Any],
    clock: Clock,
    *,
    agreed: Agreed,
    stop: StopRequest,
    read_every: int,
) -> tuple[float, Agreed]:
    """One training step and what the ranks agree on after it (the loss is None where it was not
    read; `stop` when a rank was asked to stop)."""
    tp, world = setup.params.train, setup.world
    clock.mark_warmup_end(state.step, tp.warmup_steps)
    lr = lr_at(state.step, tp, agreed.progress)
    loss = train_step(state, forward, lr, tp, setup.dtype)
    state.window.add(loss, setup.tokens_per_step())
    read_loss = state.step % read_every == 0 or state.step % tp.eval_every == 0 or state.step == tp.max_steps
    if read_loss or not world.launched:
        agreed = agree(world, clock, loss if read_loss else None, stop.requested)
    if read_loss and agreed.loss is not None:
        check_divergence(agreed.loss, state, lr, tp, len(setup.vocab))
    return lr, agreed


def stop_reason(state: TrainState, tp: TrainParams, out_of_time: bool, asked: bool) -> Stopped | None:
    """Why to stop after this evaluation, if at all. Every input is shared by the ranks (the clock and
    `asked` are rank 0's, the evaluations are shared), so all ranks stop at the same step."""
    if out_of_time:
        return "max_minutes"
    if tp.patience is not None and state.bad_evals >= tp.patience:
        return "early_stopping"
    if asked:
        return "requested"
    return None


def resume_from(state: TrainState, setup: TrainSetup, saved: dict[str, Any]) -> None:
    """Continue from the last checkpoint (`Checkpointer.load_resumable`); restore the best one too."""
    state.load_state_dict(saved, setup.world.rank)
    if not setup.world.is_main:
        return
    setup.checkpointer.restore_best(saved)
    saved_world = saved.get("world_size", 1)
    saved_batch = saved_world * saved["params"]["train"]["batch_size"]
    print(f"train: resumed from {setup.checkpointer.last_path} at step {state.step}")
    if saved_batch != state.batcher.global_batch:
        print(
            f"train: the checkpoint's steps drew {saved_batch} windows on {saved_world} process(es); with "
            f"{setup.world.world_size} x {state.batcher.batch_size} windows per step the run continues "
            "on other windows than an uninterrupted one would (keep processes x batch_size for an "
            "exact continuation)"
        )


def start_run(
    splits: dict[str, np.ndarray],
    vocab: Vocabulary,
    params: Params,
    *,
    checkpointer: Checkpointer,
    world: World,
    labels: dict[str, str],
    initial_weights: dict[str, torch.Tensor] | None = None,
    saved: dict[str, Any] | None = None,
) -> tuple[TrainState, TrainSetup]:
    """Checks, device and precision, a fresh state, or the last checkpoint's when resuming (`saved`,
    when the caller has already loaded it)."""
    tp, seq_len = params.train, params.data.seq_len
    check_fits(len(splits["train"]), seq_len, "train")
    check_fits(len(splits["val"]), seq_len, "val")
    device = world.device(tp.device)
    dtype = resolve_dtype(tp.dtype, device, params.model.cell)
    configure_backend(device, world.threads(tp.threads))
    recurrent = recurrent_dtype(device, dtype, params.model.cell)
    state = new_train_state(
        splits["train"],
        len(vocab),
        params,
        device=device,
        dtype=dtype,
        world=world,
        initial_weights=initial_weights,
        recurrent=recurrent,
    )
    # only rank 0 evaluates: the other ranks keep no copy of the validation split
    val_tokens = to_device_tokens(splits["val"] if world.is_main else splits["val"][:0], device)
    setup = TrainSetup(params, vocab, device, dtype, val_tokens, checkpointer, world, labels, recurrent)
    if tp.resume:
        resume_from(state, setup, saved or checkpointer.load_resumable(params, vocab))
    return state, setup


def train(
    splits: dict[str, np.ndarray],
    vocab: Vocabulary,
    params: Params,
    best_path: Path,
    last_path: Path,
    *,
    on_eval: EvalCallback | None = None,
    world: World | None = None,
    labels: dict[str, str] | None = None,
    initial_weights: dict[str, torch.Tensor] | None = None,
    saved: dict[str, Any] | None = None,
) -> TrainResult:
    """Train per `params`; keep the best checkpoint (by validation loss) at `best_path` and the
    resumable latest at `last_path`, both carrying `labels`. In a distributed `world` (its process
    group started) every rank calls this; rank 0 alone writes and calls `on_eval`. With
    `train.resume`, `saved` is the last checkpoint if the caller has loaded it already."""
    tp, world = params.train, world or World()
    checkpointer = Checkpointer(best_path, last_path)
    state, setup = start_run(
        splits,
        vocab,
        params,
        checkpointer=checkpointer,
        world=world,
        labels=labels or {},
        initial_weights=initial_weights,
        saved=saved,
    )
    forward = world.wrap(state.model, setup.device)
    forward = Compiled(forward) if tp.compile else forward

    clock = Clock.for_minutes(tp.max_minutes, state.train_seconds, state.warmup_s)
    bar = tqdm(
        total=tp.max_steps,
        initial=state.step,
        desc="train",
        unit="step",
        disable=None if world.is_main else True,
    )
    state.model.train()
    with stop_requests() as stop:
        try:
            stopped = run_steps(state, setup, forward, clock, stop=stop, on_eval=on_eval, bar=bar)
        except RuntimeError as exc:
            # asked to stop (a scheduler, or a killed launcher signalling every worker at once), a
            # peer that has already left fails the collective: that is the stop, not a failure
            if world.launched and stop.requested and peer_lost(exc):
                raise stop.exception() from None
            raise
    bar.close()
    return result_of(state, setup, stopped)


def run_steps(
    state: TrainState,
    setup: TrainSetup,
    forward: Callable[..., Any],
    clock: Clock,
    *,
    stop: StopRequest,
    on_eval: EvalCallback | None,
    bar: tqdm,
) -> Stopped:
    """Steps, evaluations and checkpoints until a stop: why it stopped, or the stop request raised
    once its step is saved."""
    tp, world = setup.params.train, setup.world
    # The loss is read (and, distributed, agreed on) every step only where that costs nothing: on
    # CUDA .item() waits for the device, and a collective costs about a millisecond on gloo.
    read_every = 1 if setup.device.type == "cpu" and not world.launched else 50
    agreed = Agreed()
    while state.step < tp.max_steps:
        lr, agreed = advance(state, setup, forward, clock, agreed=agreed, stop=stop, read_every=read_every)
        if agreed.loss is not None:
            bar.set_postfix(loss=f"{agreed.loss:.3f}", refresh=False)
        bar.update(1)
        if state.step % tp.eval_every == 0 or state.step == tp.max_steps or agreed.out_of_time:
            record = evaluate_and_checkpoint(state, setup, clock, lr)
            if world.is_main:
                bar.write(
                    f"step {state.step}: train {record['train_loss']:.4f}, val {record['val_loss']:.4f}, "
                    f"{record['tokens_per_sec']:,.0f} tokens/s, {state.train_seconds:.0f} s"
                )
            asked = bool(on_eval(record)) if on_eval is not None and world.is_main else False
            clock.resume()
            reason = world.from_main(stop_reason(state, tp, agreed.out_of_time, asked))
            if reason is not None:
                return reason
        if agreed.stop:  # after this step's evaluation, if it has one, so none is skipped
            save_interrupted(state, setup, clock)
            raise stop.exception()
    return "max_steps"


def result_of(state: TrainState, setup: TrainSetup, stopped: Stopped) -> TrainResult:
    if not state.history:
        raise TrainingError(
            f"train.max_steps: nothing to do, the checkpoint at {setup.checkpointer.last_path} is at step "
            f"{state.step}"
        )
    last = state.history[-1]
    return TrainResult(
        window_val_loss_best=state.best_val_loss,
        best_step=state.best_step,
        window_val_loss_last=last["val_loss"],
        train_loss_last=last["train_loss"],
        steps=state.step,
        tokens_per_sec=state.step * setup.tokens_per_step() / max(state.train_seconds, 1e-9),
        train_seconds=state.train_seconds,
        device=setup.device.type,
        dtype=dtype_name(setup.dtype),
        recurrent_dtype=dtype_name(setup.recurrent),
        processes=setup.world.world_size,
        parameters=count_parameters(state.model),
        stopped=stopped,
        history=state.history,
    )

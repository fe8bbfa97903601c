"""The training loop, assembled from small parts: a `TrainState` (state.py) whose `state_dict` a
`Checkpointer` (checkpointer.py) writes and resumes from, one `train_step` (step.py, shared with the
benchmark), one `evaluate_and_checkpoint` (periodic.py), a `Clock` for the minutes budget
(schedule.py) and a stop decision.

Knows nothing of DVC or MLflow: progress goes out through the `on_eval` callback, which may also ask
the loop to stop.

Data-parallel (a `World` of several processes, distributed.py): DDP averages the gradients; the
ranks draw disjoint slices of one global batch (batches.py); what the loop decides from local
figures (the clock, the loss for the divergence check, the evaluation, the stop) is decided on
rank 0 or from the mean over ranks and shared, so every rank takes the same steps with the same
learning rate and stops at the same step. Rank 0 alone evaluates and writes checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.data.windows import check_fits
from lstm_textgen.devices import (
    configure_backend,
    dtype_name,
    recurrent_dtype,
    resolve_dtype,
    to_device_tokens,
)
from lstm_textgen.model.recurrent import count_parameters
from lstm_textgen.params import Params, TrainParams
from lstm_textgen.train.checkpointer import Checkpointer
from lstm_textgen.train.distributed import World, peer_lost
from lstm_textgen.train.periodic import evaluate_and_checkpoint, save_interrupted
from lstm_textgen.train.schedule import Clock, lr_at
from lstm_textgen.train.setup import (
    Compiled,
    EvalCallback,
    Stopped,
    TrainingError,
    TrainResult,
    TrainSetup,
    new_train_state,
)
from lstm_textgen.train.state import TrainState
from lstm_textgen.train.step import Agreed, agree, check_divergence, train_step
from lstm_textgen.train.stopping import StopRequest, stop_requests


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

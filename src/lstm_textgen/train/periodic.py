"""Every `train.eval_every` steps: the periodic validation loss, the best checkpoint when it improves,
the resumable last checkpoint; and the checkpoint of an interrupted run. Rank 0 alone writes."""

from __future__ import annotations

import math
from typing import Any

import torch

from lstm_textgen.inference.evaluation import periodic_validation_loss
from lstm_textgen.train.schedule import Clock
from lstm_textgen.train.setup import TrainSetup
from lstm_textgen.train.state import LossWindow, TrainState


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

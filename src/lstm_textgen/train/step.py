"""One optimisation step (shared with the benchmark) and what the ranks agree on after it: the mean
loss, the clock and the stop, decided on rank 0 or from the mean so that every rank takes the same
steps; a diverged loss is refused with what to change."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lstm_textgen.devices import (
    autocast,
)
from lstm_textgen.model.recurrent import detach_state
from lstm_textgen.params import TrainParams
from lstm_textgen.train.distributed import World
from lstm_textgen.train.schedule import Clock
from lstm_textgen.train.setup import DivergedError
from lstm_textgen.train.state import TrainState


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

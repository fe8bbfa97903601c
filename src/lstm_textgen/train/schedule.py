"""The learning-rate schedule and the training clock.

Warm-up, then cosine decay to `lr * min_lr_ratio`. The decay follows whichever budget runs out first:
the steps (`train.max_steps`) or the training minutes (`train.max_minutes`), so a run stopped by the
clock still ends at the low learning rate, on a fast machine or a slow one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from lstm_textgen.params import TrainParams


def lr_at(step: int, train: TrainParams, clock_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (or constant). `clock_progress` is the
    share of the clock budget after warm-up already spent; the decay follows it when it is ahead of
    the steps."""
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


@dataclass
class Clock:
    """Seconds spent training, across resumes, evaluations excluded: what `train.max_minutes` counts.

    `before_s` is what earlier processes trained (from the checkpoint); `warmup_s` the training
    seconds at which warm-up ended, where the clock's cosine starts (None while warming up)."""

    budget_s: float = math.inf
    before_s: float = 0.0
    warmup_s: float | None = None
    _started: float = field(default_factory=time.monotonic)
    _paused_s: float = 0.0
    _pause_started: float | None = None

    @classmethod
    def for_minutes(cls, max_minutes: float | None, before_s: float, warmup_s: float | None) -> Clock:
        return cls(max_minutes * 60 if max_minutes else math.inf, before_s, warmup_s)

    def trained_s(self) -> float:
        paused = self._paused_s + (time.monotonic() - self._pause_started if self._pause_started else 0.0)
        return self.before_s + time.monotonic() - self._started - paused

    def pause(self) -> None:
        """Stop counting (an evaluation starts)."""
        self._pause_started = time.monotonic()

    def resume(self) -> None:
        if self._pause_started is not None:
            self._paused_s += time.monotonic() - self._pause_started
            self._pause_started = None

    def mark_warmup_end(self, step: int, warmup_steps: int) -> None:
        if self.warmup_s is None and step >= warmup_steps:
            self.warmup_s = self.trained_s()

    def progress(self) -> float:
        return progress_by_clock(self.trained_s(), self.warmup_s, self.budget_s)

    def out_of_time(self) -> bool:
        return self.trained_s() >= self.budget_s

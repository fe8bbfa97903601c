"""What a `RowBatcher` runs: a `Row` (one prompt's generation: its tokens, settings, stream, deadline
and answer) and a `Job` (work done on the batcher's thread between steps, such as scoring), the
limits of one batch and the two ways a row is refused or ended early."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lstm_textgen.errors import UserError
from lstm_textgen.inference.drawing import row_random
from lstm_textgen.params import Sampling


@dataclass(frozen=True)
class BatchLimits:
    """How many rows step together, and how many may wait for a place; more are refused. A step
    also draws at most `draws_per_step` uniforms (a mode row of N draws counts N): rows beyond it
    wait, so a few heavy rows cannot slow every other row's step without bound."""

    active_rows: int = 64
    waiting_rows: int = 256
    draws_per_step: int = 4096


class Overloaded(UserError):
    """Every place, active and waiting, is taken: the caller should retry later (HTTP 503)."""


class Stopped(Overloaded):
    """A row cut short because its server is stopping (SIGTERM, after its grace period): the client
    should send the request again, to a server that runs (HTTP 503)."""


class Cancelled(UserError):
    """A row was cancelled (its client went away, or pressed Stop) or passed its deadline."""


_END = object()  # the end of a streamed row

# A drawn token's log-probability under the model (temperature 1, before any top-k or top-p) and the
# most likely tokens' (id, log-probability), most likely first: what OpenAI's `logprobs` reports.
TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]


class Row:
    """One prompt's generation: its tokens as they are drawn, its end, its error if any.

    Written by the batcher's thread, read by the caller's: `result()` waits for the whole row,
    `stream()` yields each token as soon as it is drawn. `cancel()` frees the row at the next step.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: Sampling,
        *,
        stream: bool = False,
        deadline: float | None = None,
        abandoned: threading.Event | None = None,
        logprobs: int | None = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.random = row_random(sampling)
        self.deadline = deadline  # time.monotonic() after which the row is dropped
        self.abandoned = abandoned  # set when the client went away (the served model)
        self.tokens: list[int] = []
        self.logprobs = logprobs  # None: none kept; k: each token's, and the k most likely tokens'
        self.token_logprobs: list[TokenLogprob] = []
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()
        self._stream: queue.SimpleQueue[object] | None = queue.SimpleQueue() if stream else None

    def emit(self, token: int, logprob: TokenLogprob | None = None) -> None:
        if logprob is not None:
            self.token_logprobs.append(logprob)  # before the token: a reader of the token finds it
        self.tokens.append(token)
        if self._stream is not None:
            self._stream.put(token)

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()
        if self._stream is not None:
            self._stream.put(_END)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def expired(self) -> bool:
        if self.cancelled or (self.abandoned is not None and self.abandoned.is_set()):
            return True
        return self.deadline is not None and time.monotonic() > self.deadline

    def result(self) -> list[int]:
        """The row's tokens once it has them all; its error, if it failed."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.tokens

    def stream(self) -> Iterator[int]:
        """Each token as it is drawn (a row made with `stream=True`)."""
        assert self._stream is not None, "made without stream=True"
        while (token := self._stream.get()) is not _END:
            yield token  # type: ignore[misc]
        if self.error is not None:
            raise self.error


class Job:
    """Work on whole texts (scoring a request's rows) that runs on the batcher's thread between two
    steps: `work()` is called there unless the job was cancelled or passed its deadline first."""

    def __init__(
        self,
        work: Callable[[], Any],
        rows: int,
        deadline: float | None = None,
        abandoned: threading.Event | None = None,
    ) -> None:
        self.work, self.rows = work, rows
        self.deadline, self.abandoned = deadline, abandoned
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        gone = self.abandoned is not None and self.abandoned.is_set()
        if gone or (self.deadline is not None and time.monotonic() > self.deadline):
            self.finish(error=Cancelled("the request was cancelled or passed its time limit"))
            return
        try:
            self.finish(value=self.work())
        except Exception as exc:
            self.finish(error=exc)

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self.done.set()

    def result(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value

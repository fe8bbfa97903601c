"""Continuous batching for a recurrent model: every active row advances one token per step together.

A recurrent model's whole context is its state vector, so rows need no padding and no cache: a row
joins at the next step (its prompt warmed by the sequence kernel, its state appended to the batch)
and leaves when it has its tokens, is cancelled, or passes its deadline (its state row dropped).
Rows differ in prompt, length, strategy, temperature, top-k, top-p and seed (`drawing.py`); each
draws from its own random stream, so its text is the text it gets alone.

One `Batcher` per loaded model. The served model and the demo run it on a background thread, which
every request thread feeds (MLflow's scoring server calls `predict` from a thread pool); the sample
command and stage drive its steps in their own thread (`run`, `follow`). Beyond `active_rows`,
rows wait in a queue of `waiting_rows`; beyond that `submit` refuses them (`Overloaded`), at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lstm_textgen.errors import UserError
from lstm_textgen.inference.drawing import draw, plan_draws, row_random
from lstm_textgen.model.recurrent import RecurrentLM, State
from lstm_textgen.params import Sampling


@dataclass(frozen=True)
class BatchLimits:
    """How many rows step together, and how many may wait for a place; more are refused."""

    active_rows: int = 64
    waiting_rows: int = 256


class Overloaded(UserError):
    """Every place, active and waiting, is taken: the caller should retry later (HTTP 503)."""


class Cancelled(UserError):
    """A row was cancelled (its client went away, or pressed Stop) or passed its deadline."""


_END = object()  # the end of a streamed row


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
        stream: bool = False,
        deadline: float | None = None,
        abandoned: threading.Event | None = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.random = row_random(sampling)
        self.deadline = deadline  # time.monotonic() after which the row is dropped
        self.abandoned = abandoned  # set when the client went away (the served model)
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()
        self._stream: queue.SimpleQueue[object] | None = queue.SimpleQueue() if stream else None

    def emit(self, token: int) -> None:
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


class Batcher:
    """The scheduler of one model: rows join, step together, leave (see the module's docstring)."""

    def __init__(self, model: RecurrentLM, limits: BatchLimits | None = None) -> None:
        self.model = model.eval()
        self.limits = limits or BatchLimits()
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []  # active, in the order of the state's batch rows
        self.waiting: list[Row] = []
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self._empty()

    def _empty(self) -> None:
        """No active rows: an empty state, no logits, no plan."""
        rnn = self.model.rnn
        zeros = torch.zeros(rnn.num_layers, 0, rnn.hidden_size, device=self.device)
        self.stepper = self.model.stepper((zeros, zeros.clone()) if isinstance(rnn, torch.nn.LSTM) else zeros)
        self.logits = torch.empty(0, self.model.vocab_size, device=self.device)
        self.plan = plan_draws([], self.device)

    # --- callers ---------------------------------------------------------------------------------

    def submit(self, rows: Sequence[Row]) -> None:
        """Queue rows to join at the next step, all or none: refused with `Overloaded` when they do
        not fit in the active and waiting places."""
        with self.lock:
            places = self.limits.active_rows + self.limits.waiting_rows
            taken = len(self.rows) + len(self.waiting)
            if taken + len(rows) > places:
                raise Overloaded(
                    f"the server is busy: {len(self.rows)} rows generating and {len(self.waiting)} "
                    f"waiting, at most {places} in all; retry in a moment"
                )
            self.waiting.extend(rows)
            self.lock.notify()

    def start(self) -> Batcher:
        """Step on a background thread from now on, whenever rows are there (the served model)."""
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="batcher", daemon=True)
                self.thread.start()
        return self

    def run(self, rows: Sequence[Row]) -> list[list[int]]:
        """Without a thread: submit `rows`, step until they are done, return their tokens."""
        assert self.thread is None, "a started batcher steps on its own thread: use submit and result"
        self.submit(rows)
        while not all(row.done.is_set() for row in rows):
            self.step()
        return [row.result() for row in rows]

    def follow(self, row: Row) -> Iterator[int]:
        """Without a thread: submit one row and yield its tokens as the steps draw them."""
        assert self.thread is None, "a started batcher steps on its own thread: use submit and stream"
        self.submit([row])
        seen = 0
        try:
            while not row.done.is_set():
                self.step()
                yield from row.tokens[seen:]
                seen = len(row.tokens)
        finally:
            row.cancel()
        if row.error is not None:
            raise row.error

    # --- the scheduler ---------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self.lock:
                while not self.rows and not self.waiting:
                    self.lock.wait()
            try:
                self.step()
            except Exception as exc:
                self._fail_all(exc)

    def step(self) -> None:
        """Admit waiting rows, draw one token for every active row, drop the finished ones, advance
        the state of the others."""
        self._admit()
        if not self.rows:
            return
        tokens = draw(self.logits, self.plan, [row.random for row in self.rows])
        keep = []
        for index, (row, token) in enumerate(zip(self.rows, tokens.tolist(), strict=True)):
            if row.expired:
                row.finish(Cancelled("the request was cancelled or passed its time limit"))
                continue
            row.emit(token)
            if len(row.tokens) >= row.max_new_tokens:
                row.finish()
            else:
                keep.append(index)
        if len(keep) < len(self.rows):
            self._keep(keep)
            tokens = tokens[keep]
        self.logits = self.stepper(tokens) if self.rows else self.logits[:0]

    def _admit(self) -> None:
        with self.lock:
            free = self.limits.active_rows - len(self.rows)
            joining, self.waiting = self.waiting[:free], self.waiting[free:]
        for row in joining:
            if row.expired:
                row.finish(Cancelled("the request was cancelled before it started"))
        joining = [row for row in joining if not row.done.is_set()]
        if not joining:
            return
        try:
            warmed = [(joining, self._warm(joining))]
        except Exception:
            warmed = [([row], self._warm_alone(row)) for row in joining]
        for rows, result in warmed:
            if result is None:
                continue
            logits, state = result
            self.stepper.add_rows(state)
            self.logits = torch.cat([self.logits, logits])
            with self.lock:
                self.rows = self.rows + rows
        self.plan = plan_draws([row.sampling for row in self.rows], self.device)

    def _warm(self, rows: list[Row]) -> tuple[torch.Tensor, State]:
        with torch.no_grad():
            return warm_up(self.model, [row.prompt_ids for row in rows], self.device)

    def _warm_alone(self, row: Row) -> tuple[torch.Tensor, State] | None:
        try:
            return self._warm([row])
        except Exception as exc:
            row.finish(exc)
            return None

    def _keep(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.stepper.keep_rows(index)
        with self.lock:
            self.rows = [self.rows[i] for i in keep]
        self.plan = plan_draws([row.sampling for row in self.rows], self.device)

    def _fail_all(self, exc: BaseException) -> None:
        with self.lock:
            failed, self.rows = self.rows, []
        for row in failed:
            row.finish(exc)
        self._empty()


def warm_up(
    model: RecurrentLM, prompt_ids: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, State]:
    """[B, V] next-token logits and the state after each prompt. Prompts of equal length share one
    call of the sequence kernel (a batch of 64 copies of a prompt is one call, not 64); the rows
    come back in the prompts' order."""
    by_length: dict[int, list[int]] = {}
    for row, ids in enumerate(prompt_ids):
        by_length.setdefault(len(ids), []).append(row)
    outputs = [
        model(
            torch.tensor([list(prompt_ids[r]) for r in rows], dtype=torch.long, device=device), last_only=True
        )
        for rows in by_length.values()
    ]
    grouped_rows = torch.tensor([r for rows in by_length.values() for r in rows], device=device)
    back = grouped_rows.argsort()  # from the grouped order to the prompts' order
    logits = torch.cat([group_logits for group_logits, _ in outputs])[back]
    states = [group_state for _, group_state in outputs]
    if isinstance(states[0], tuple):  # LSTM: (h, c)
        pairs = zip(*states, strict=True)
        return logits.float(), tuple(torch.cat(parts, dim=1)[:, back] for parts in pairs)  # type: ignore[return-value]
    return logits.float(), torch.cat(states, dim=1)[:, back]  # type: ignore[arg-type]

"""Continuous batching for a recurrent model: every active row advances one token per step together.

A recurrent model's whole context is its state vector, so rows need no padding and no cache: a row
joins at the next step (its prompt warmed by the sequence kernel, its state appended to the batch)
and leaves when it has its tokens, is cancelled, or passes its deadline (its state row dropped).
Rows differ in prompt, length, strategy, temperature, top-k, top-p and seed (`drawing.py`); each
draws from its own random stream, so its text is the text it gets alone.

One `RowBatcher` per loaded model. The served model and the demo run it on a background thread, which
every request thread feeds (MLflow's scoring server calls `predict` from a thread pool); the sample
command and stage drive its steps in their own thread (`run`, `follow`). Beyond `active_rows`,
rows wait in a queue of `waiting_rows`; beyond that `submit` refuses them (`Overloaded`), at once.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Iterator, Sequence

import torch

from lstm_textgen.errors import UserError
from lstm_textgen.inference.drawing import draw_with, invalid_rows, plan_draws, take_uniforms
from lstm_textgen.inference.rows import BatchLimits, Cancelled, Job, Overloaded, Row, Stopped, TokenLogprob
from lstm_textgen.model.recurrent import RecurrentLM, State
from lstm_textgen.model.stepper import Stepper, warm_up


class RowBatcher:
    """The scheduler of one model: rows join, step together, leave (see the module's docstring)."""

    def __init__(self, model: RecurrentLM, limits: BatchLimits | None = None) -> None:
        self.model = model.eval()
        self.limits = limits or BatchLimits()
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []  # active, in the order of the state's batch rows
        self.waiting: list[Row] = []
        self.jobs: list[Job] = []
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.failed_steps = 0
        self.started = self.stopping = self.draining = False
        self.cut: Stopped | None = None  # set when a draining server cuts its rows short
        self._empty()

    def _empty(self) -> None:
        """No active rows: an empty state, no logits, no plan."""
        rnn = self.model.rnn
        zeros = torch.zeros(rnn.num_layers, 0, rnn.hidden_size, device=self.device)
        state = (zeros, zeros.clone()) if isinstance(rnn, torch.nn.LSTM) else zeros
        self.stepper = Stepper(self.model, state)
        self.logits = torch.empty(0, self.model.vocab_size, device=self.device)
        self.plan = plan_draws([], self.device)

    # --- callers ---------------------------------------------------------------------------------

    def submit(self, rows: Sequence[Row]) -> None:
        """Queue rows to join at the next step, all or none: refused with `Overloaded` when they do
        not fit in the active and waiting places, with `ParamsError` when a row's settings do not fit
        the model (top_k beyond its vocabulary)."""
        for row in rows:
            row.sampling.check_vocabulary(self.model.vocab_size)
        with self.lock:
            self._check_places(len(rows))
            self.waiting.extend(rows)
            self.lock.notify()
        self._restart_if_dead()

    def submit_job(self, job: Job) -> None:
        """Queue whole-text work (scoring `job.rows` rows) to run between steps; it takes places as
        rows do, so a full batcher refuses it with `Overloaded`."""
        with self.lock:
            self._check_places(job.rows)
            self.jobs.append(job)
            self.lock.notify()
        self._restart_if_dead()

    def _check_places(self, wanted: int) -> None:
        if self.stopping:
            raise Cancelled("the model was closed (close() or the end of the program): load it again")
        if self.draining:
            raise Overloaded("the server is stopping: send the request again (another replica takes it)")
        places = self.limits.active_rows + self.limits.waiting_rows
        taken = len(self.rows) + len(self.waiting) + sum(job.rows for job in self.jobs)
        if taken + wanted > places:
            raise Overloaded(
                f"the server is busy: {len(self.rows)} rows generating and {taken - len(self.rows)} "
                f"waiting, at most {places} in all; retry in a moment"
            )

    def _restart_if_dead(self) -> None:
        """A started batcher whose thread died (what it held has been failed) starts a new one."""
        with self.lock:
            if self.thread is not None and not self.thread.is_alive():
                self.failed_steps = 0
                self._empty()
                self.thread = None
        if self.thread is None and self.started:
            self.start()

    def start(self) -> RowBatcher:
        """Step on a background thread from now on, whenever rows are there (the served model)."""
        with self.lock:
            self.started, self.stopping = True, False
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="batcher", daemon=True)
                self.thread.start()
                atexit.register(self.stop)
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

    @property
    def busy(self) -> bool:
        with self.lock:
            return bool(self.rows or self.waiting or self.jobs)

    def drain(self, seconds: float, poll: float = 0.05) -> int:
        """Admit nothing more (`submit` refuses with `Overloaded`: HTTP 503, the client retries) and
        let every row already queued finish, up to `seconds`; then cut what is left short with
        `Stopped` (HTTP 503), which names the shutdown. Returns the number of rows cut. For a
        server's SIGTERM."""
        with self.lock:
            self.draining = True
        deadline = time.monotonic() + seconds
        while self.busy and time.monotonic() < deadline:
            time.sleep(poll)
        with self.lock:
            left = self.rows + self.waiting
            self.cut = Stopped(
                f"the server stopped before this text was finished (it waited {seconds:g} s for the "
                "texts being generated); send the request again"
            )
            for row in left:
                row.cancel()
        ended = time.monotonic() + 5.0  # the next step ends them: their answers go out before exit
        while self.busy and time.monotonic() < ended:
            time.sleep(poll)
        return len(left)

    # --- the scheduler ---------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> None:
        """End the background thread and join it: what still waits or generates fails with
        `Cancelled`. Registered at exit by `start`: a thread that has run torch code and is still
        waiting when the interpreter finalises can abort the process (`terminate called without an
        active exception`, exit code 134)."""
        with self.lock:
            self.started, self.stopping = False, True
            self.lock.notify_all()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _serve(self) -> None:
        try:
            while not self.stopping:
                with self.lock:
                    while not self.rows and not self.waiting and not self.jobs and not self.stopping:
                        self.lock.wait()
                if self.stopping:
                    break
                self._run_jobs()
                try:
                    self.step()
                    self.failed_steps = 0
                except Exception as exc:  # the model itself failed (out of memory, a broken device)
                    self.failed_steps += 1
                    self._fail_all(exc)
        except BaseException as exc:  # never leave a row waiting on a thread that is gone
            self.failed_steps = self.MAX_FAILED_STEPS
            self._fail_all(exc, waiting_too=True)
            raise
        self._fail_all(Cancelled("the model was closed"), waiting_too=True)

    # consecutive steps that failed every row: the device or model is broken, not a request
    MAX_FAILED_STEPS = 3

    @property
    def healthy(self) -> bool:
        """Whether the batcher can step: its thread runs (when started) and the model's steps work.
        The served model's /ping and /health answer 503 when not, so a supervisor restarts it."""
        alive = self.thread is None or self.thread.is_alive()
        return alive and self.failed_steps < self.MAX_FAILED_STEPS and not self.draining

    def step(self) -> None:
        """Admit waiting rows, draw one token for every active row, drop the finished ones, advance
        the state of the others. A row whose draw fails, or draws an id outside the vocabulary, fails
        alone; the others keep their tokens."""
        self._admit()
        if not self.rows:
            return
        tokens, errors = self._draw()
        logprobs = self._logprobs(tokens)
        keep = []
        for index, (row, token) in enumerate(zip(self.rows, tokens.tolist(), strict=True)):
            if index in errors:
                row.finish(errors[index])
                continue
            if row.expired:
                row.finish(self.cut or Cancelled("the request was cancelled or passed its time limit"))
                continue
            row.emit(token, logprobs.get(index))
            if len(row.tokens) >= row.max_new_tokens:
                row.finish()
            else:
                keep.append(index)
        if len(keep) < len(self.rows):
            self._keep(keep)
            tokens = tokens[keep]
        self.logits = self.stepper(tokens) if self.rows else self.logits[:0]

    def _draw(self) -> tuple[torch.Tensor, dict[int, BaseException]]:
        """Every row's next token, and the rows that could not draw one (with why)."""
        settings = [row.sampling for row in self.rows]
        u = take_uniforms(settings, [row.random for row in self.rows])
        errors: dict[int, BaseException] = {}
        try:
            tokens = draw_with(self.logits, self.plan, u)
        except Exception:  # redraw row by row with the same uniforms: only the culprit fails
            tokens = torch.zeros(len(self.rows), dtype=torch.long, device=self.device)
            for index, sampling in enumerate(settings):
                try:
                    one = plan_draws([sampling], self.device)
                    tokens[index] = draw_with(self.logits[index : index + 1], one, [u[index]])[0]
                except Exception as exc:
                    errors[index] = exc
        for index in invalid_rows(self.logits, tokens):
            errors.setdefault(index, UserError("this row's logits overflowed: try a higher temperature"))
        return tokens, errors

    def _logprobs(self, tokens: torch.Tensor) -> dict[int, TokenLogprob]:
        """For the rows that asked: each drawn token's log-probability and the most likely tokens'."""
        wanted = [index for index, row in enumerate(self.rows) if row.logprobs is not None]
        if not wanted:
            return {}
        index = torch.tensor(wanted, dtype=torch.long, device=self.device)
        logp = torch.log_softmax(self.logits[index].float(), dim=-1)
        chosen = logp.gather(1, tokens[index].clamp(0, logp.shape[1] - 1).unsqueeze(1)).squeeze(1).tolist()
        k = min(max(self.rows[i].logprobs or 0 for i in wanted), logp.shape[1])
        values, ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        values_list, ids_list = values.tolist(), ids.tolist()
        out = {}
        for position, row_index in enumerate(wanted):
            top = self.rows[row_index].logprobs or 0
            pairs = tuple(zip(ids_list[position][:top], values_list[position][:top], strict=True))
            out[row_index] = (chosen[position], pairs)
        return out

    def _run_jobs(self) -> None:
        """Whole-text work (scoring) queued beside the rows: run between steps, on this thread, so it
        shares the model with generation instead of racing it from a request thread."""
        with self.lock:
            jobs, self.jobs = self.jobs, []
        for job in jobs:
            job.run()

    def _admit(self) -> None:
        with self.lock:
            free = self.limits.active_rows - len(self.rows)
            budget = self.limits.draws_per_step - sum(row.sampling.draws_per_step() for row in self.rows)
            count = 0
            for row in self.waiting[:free]:
                cost = row.sampling.draws_per_step()
                if cost > budget and (self.rows or count):  # a row alone always fits
                    break
                budget -= cost
                count += 1
            joining, self.waiting = self.waiting[:count], self.waiting[count:]
        for row in joining:
            if row.expired:
                row.finish(self.cut or Cancelled("the request was cancelled before it started"))
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

    def _fail_all(self, exc: BaseException, waiting_too: bool = False) -> None:
        with self.lock:
            failed, self.rows = self.rows, []
            if waiting_too:
                failed, self.waiting, jobs, self.jobs = failed + self.waiting, [], self.jobs, []
                for job in jobs:
                    job.finish(error=exc)
        for row in failed:
            row.finish(exc)
        self._empty()

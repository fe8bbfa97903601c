"""Continuous batching: every row's tokens equal its solo run, whatever joins or leaves beside it;
cancelled, expired and failing rows leave without touching the others; a full batcher refuses."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lstm_textgen.errors import UserError
from lstm_textgen.inference.batcher import RowBatcher
from lstm_textgen.inference.rows import BatchLimits, Cancelled, Job, Overloaded, Row
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.params import ModelParams, ParamsError, Sampling

VOCAB = 29

# rows differing in prompt, length, strategy, temperature, top-k, top-p and seed
SETTINGS = [
    ([1, 2, 3], 40, Sampling(strategy="sample", temperature=1.3, seed=1)),
    ([4], 7, Sampling(strategy="greedy")),
    ([5, 6, 7, 8, 9, 10, 11], 55, Sampling(strategy="sample", temperature=0.9, top_k=5, seed=2)),
    ([12, 13], 23, Sampling(strategy="sample", temperature=1.0, top_p=0.8, seed=3)),
    ([1, 2, 3], 31, Sampling(strategy="sample", temperature=1.3, seed=4)),
    ([14, 15, 16], 12, Sampling(strategy="mode", draws=9, temperature=1.1, seed=5)),
    ([17], 48, Sampling(strategy="sample", temperature=2.0, top_k=3, top_p=0.9, seed=6)),
    ([18, 19, 20, 21], 1, Sampling(strategy="sample", seed=7)),
]


@pytest.fixture(scope="module", params=["lstm", "gru"])
def model(request) -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(VOCAB, ModelParams(cell=request.param, layers=2, hidden=32, embedding_dim=8)).eval()


def rows(settings=SETTINGS, **options) -> list[Row]:
    return [Row(ids, length, sampling, **options) for ids, length, sampling in settings]


def solo(model: RecurrentLM, settings=SETTINGS) -> list[list[int]]:
    return [RowBatcher(model).run([row])[0] for row in rows(settings)]


def test_rows_joining_at_different_steps_equal_their_solo_runs(model: RecurrentLM) -> None:
    batcher = RowBatcher(model)
    joining = rows()
    batcher.submit(joining[:2])
    for _ in range(3):
        batcher.step()
    batcher.submit(joining[2:5])  # join while the first two are mid-way
    batcher.step()
    batcher.submit(joining[5:])
    while not all(row.done.is_set() for row in joining):
        batcher.step()
    assert [row.result() for row in joining] == solo(model)
    assert [len(row.tokens) for row in joining] == [length for _, length, _ in SETTINGS]
    assert not batcher.rows and not batcher.waiting  # every finished row has left


def test_threaded_requests_meet_in_one_batch_and_equal_their_solo_runs(model: RecurrentLM) -> None:
    batcher = RowBatcher(model)
    sizes: list[int] = []
    step = batcher.step

    def recorded_step() -> None:
        step()
        sizes.append(len(batcher.rows))

    batcher.step = recorded_step  # type: ignore[method-assign]
    batcher.start()
    requests = [rows() for _ in range(4)]  # 32 rows from 4 threads at once
    threads = [threading.Thread(target=batcher.submit, args=(request,)) for request in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = solo(model)
    for request in requests:
        assert [row.result() for row in request] == expected
    assert max(sizes) > len(SETTINGS)  # rows of different requests stepped together


def test_streamed_tokens_arrive_as_drawn_and_equal_the_result(model: RecurrentLM) -> None:
    batcher = RowBatcher(model).start()
    streamed = Row(*SETTINGS[0], stream=True)
    batcher.submit([streamed, *rows()[1:]])
    assert list(streamed.stream()) == streamed.result() == solo(model)[0]


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_go_on(model: RecurrentLM) -> None:
    batcher = RowBatcher(model)
    running = rows()
    batcher.submit(running)
    for _ in range(5):
        batcher.step()
    running[2].cancel()
    batcher.step()
    assert running[2] not in batcher.rows
    with pytest.raises(Cancelled):
        running[2].result()
    while not all(row.done.is_set() for row in running):
        batcher.step()
    expected = solo(model)
    assert [running[i].result() for i in (0, 1, 3, 4, 5, 6, 7)] == [
        expected[i] for i in (0, 1, 3, 4, 5, 6, 7)
    ]


def test_a_row_past_its_deadline_is_dropped(model: RecurrentLM) -> None:
    batcher = RowBatcher(model)
    late = Row([1, 2], 500, Sampling(seed=1), deadline=time.monotonic() + 0.5)
    batcher.submit([late])
    for _ in range(3):
        batcher.step()
    time.sleep(0.6)
    batcher.step()
    with pytest.raises(Cancelled):
        late.result()
    assert len(late.tokens) == 3 and not batcher.rows


def test_a_row_that_fails_to_warm_fails_alone(model: RecurrentLM) -> None:
    batcher = RowBatcher(model)
    bad = Row([1, VOCAB + 5], 10, Sampling(seed=1))  # an id past the vocabulary
    good = rows()
    batcher.submit([*good[:3], bad, *good[3:]])
    while not all(row.done.is_set() for row in [*good, bad]):
        batcher.step()
    with pytest.raises(IndexError):
        bad.result()
    assert [row.result() for row in good] == solo(model)


def test_a_full_batcher_refuses_whole_requests_at_once(model: RecurrentLM) -> None:
    batcher = RowBatcher(model, BatchLimits(active_rows=2, waiting_rows=3))
    batcher.submit(rows()[:4])
    with pytest.raises(Overloaded, match="4 waiting, at most 5 in all; retry"):
        batcher.submit(rows()[:2])  # all or none: not even one of the two joins
    batcher.submit(rows()[:1])
    batcher.step()
    assert len(batcher.rows) == 2 and len(batcher.waiting) == 3


def test_a_batcher_that_emptied_takes_new_rows(model: RecurrentLM) -> None:
    batcher = RowBatcher(model)
    first, second = rows()[:2], rows()[2:5]
    assert batcher.run(first) == solo(model)[:2]
    assert batcher.run(second) == solo(model)[2:5]


def test_a_row_whose_client_went_away_leaves_at_the_next_step(model: RecurrentLM) -> None:
    batcher = RowBatcher(model)
    gone = threading.Event()
    abandoned = Row([1, 2], 500, Sampling(seed=1), abandoned=gone)
    others = rows()
    batcher.submit([abandoned, *others])
    for _ in range(4):
        batcher.step()
    gone.set()
    batcher.step()
    assert abandoned not in batcher.rows and len(abandoned.tokens) == 4
    with pytest.raises(Cancelled):
        abandoned.result()
    while not all(row.done.is_set() for row in others):
        batcher.step()
    assert [row.result() for row in others] == solo(model)


# --- one row never breaks the others: a row's own failure, a broken model, a dead thread ---


def test_a_row_whose_draw_overflows_fails_alone(model: RecurrentLM) -> None:
    """Sampling refuses such a temperature (test_params); a row that reaches the batcher anyway (the
    check bypassed) fails alone, with the others drawing exactly their solo tokens."""
    overflow = Sampling.model_construct(
        strategy="sample", temperature=1e-45, top_k=None, top_p=None, draws=80, seed=1
    )
    bad, good = Row([1, 2], 10, overflow), rows()
    batcher = RowBatcher(model)
    batcher.submit([*good[:2], bad, *good[2:]])
    while not all(row.done.is_set() for row in [*good, bad]):
        batcher.step()
    with pytest.raises(UserError, match="overflowed: try a higher temperature"):
        bad.result()
    assert [row.result() for row in good] == solo(model)


def test_top_k_beyond_the_vocabulary_is_refused_before_any_row_joins(model: RecurrentLM) -> None:
    batcher = RowBatcher(model)
    too_wide = Row([1], 5, Sampling(top_k=2**70, seed=1))
    with pytest.raises(ParamsError, match=rf"top_k must be at most the vocabulary size \({VOCAB} tokens\)"):
        batcher.submit([*rows()[:2], too_wide])
    assert not batcher.waiting


def test_heavy_mode_rows_wait_for_the_step_budget_and_still_equal_their_solo_runs(model: RecurrentLM) -> None:
    heavy = [([1, 2], 6, Sampling(strategy="mode", draws=900, seed=s)) for s in (1, 2, 3)]
    settings = [*heavy, *SETTINGS[:3]]
    batcher = RowBatcher(model, BatchLimits(draws_per_step=1000))
    joining = rows(settings)
    batcher.submit(joining)
    batcher.step()
    assert sum(row.sampling.draws_per_step() for row in batcher.rows) <= 1000
    assert len(batcher.waiting) >= 2  # the other heavy rows wait for the first to finish
    while not all(row.done.is_set() for row in joining):
        batcher.step()
    assert [row.result() for row in joining] == solo(model, settings)


class Breaking:
    """A model's step that fails from the nth call on (`error` an instance to raise), as a broken
    device would make it."""

    def __init__(self, stepper, error: BaseException, times: int) -> None:
        self.stepper, self.error, self.times = stepper, error, times

    def __call__(self, tokens):
        if self.times > 0:
            self.times -= 1
            raise self.error
        return self.stepper(tokens)

    def __getattr__(self, name):
        return getattr(self.stepper, name)


def wait_done(handles: list[Row], seconds: float = 60) -> None:
    for handle in handles:
        assert handle.done.wait(seconds), "a row was left without an answer"


def test_a_model_that_fails_every_step_turns_the_batcher_unhealthy(model: RecurrentLM, monkeypatch) -> None:
    from lstm_textgen.inference import batcher as batching
    from lstm_textgen.model.stepper import Stepper

    lost = RuntimeError("device lost")
    monkeypatch.setattr(batching, "Stepper", lambda net, state: Breaking(Stepper(net, state), lost, 10**6))
    batcher = RowBatcher(model).start()
    assert batcher.healthy
    for attempt in range(RowBatcher.MAX_FAILED_STEPS):
        handles = rows()[:2]
        batcher.submit(handles)
        wait_done(handles)
        for handle in handles:
            with pytest.raises(RuntimeError, match="device lost"):
                handle.result()
        assert batcher.healthy is (attempt + 1 < RowBatcher.MAX_FAILED_STEPS)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_batcher_whose_thread_died_answers_its_rows_and_starts_again(model: RecurrentLM) -> None:
    batcher = RowBatcher(model).start()
    batcher.stepper = Breaking(batcher.stepper, SystemExit("gone"), 1)
    first = rows()[:2]
    batcher.submit(first)
    wait_done(first)  # failed, not left waiting on a thread that is gone
    batcher.thread.join(timeout=30)
    assert not batcher.healthy
    again = rows()[:3]
    batcher.submit(again)  # a new thread, a fresh state
    wait_done(again)
    assert [row.result() for row in again] == solo(model)[:3] and batcher.healthy


def test_scoring_jobs_run_between_steps_and_take_places(model: RecurrentLM) -> None:
    batcher = RowBatcher(model, BatchLimits(active_rows=2, waiting_rows=2)).start()
    ran = threading.Event()
    job = Job(lambda: ran.set() or "scored", rows=2)
    batcher.submit_job(job)
    assert job.result() == "scored" and ran.is_set()
    late = Job(lambda: pytest.fail("ran past its deadline"), rows=1, deadline=time.monotonic() - 1)
    batcher.submit_job(late)
    with pytest.raises(Cancelled):
        late.result()
    gate = threading.Event()
    blocking = Job(gate.wait, rows=3)  # holds the thread: three of four places taken meanwhile
    batcher.submit_job(blocking)
    with pytest.raises(Overloaded):
        batcher.submit_job(Job(lambda: None, rows=2))
    gate.set()
    blocking.result()


EXIT_AFTER_GENERATING = """
import torch
from lstm_textgen.inference.batcher import RowBatcher
from lstm_textgen.inference.rows import Row
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.params import ModelParams, Sampling
torch.manual_seed(0)
model = RecurrentLM(29, ModelParams(cell="gru", layers=2, hidden=32, embedding_dim=8)).eval()
batcher = RowBatcher(model).start()
row = Row([1, 2, 3], 20, Sampling(seed=1))
batcher.submit([row])
print(len(row.result()))
"""


@pytest.mark.slow
def test_processes_that_started_a_batcher_thread_exit_cleanly() -> None:
    """The thread is stopped and joined at exit: a daemon thread that ran torch code and still waits
    as the interpreter finalises aborted such processes now and then (exit code 134). A GRU here; the
    registered LSTM in 12 scripts through MLflow in test_own_process.py."""
    import subprocess
    import sys

    for _ in range(10):
        done = subprocess.run([sys.executable, "-c", EXIT_AFTER_GENERATING], capture_output=True, text=True)
        assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "20", "")

"""The model, the training loop and the checkpoint: shapes, learning, determinism, exact resume."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_training, build_vocabulary, split_ids, tiny_params

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.devices import DeviceError, resolve_dtype
from lstm_textgen.errors import UserError
from lstm_textgen.model.checkpoint import load_checkpoint, load_model
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.params import ModelParams, Params, with_settings
from lstm_textgen.train.checkpointer import ResumeError
from lstm_textgen.train.loop import train
from lstm_textgen.train.schedule import lr_at, progress_by_clock
from lstm_textgen.train.setup import TrainingError

TEXT = "the quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture(scope="module")
def data() -> tuple[dict[str, np.ndarray], Vocabulary]:
    vocab = build_vocabulary(TEXT, "char", lowercase=False)
    return split_ids(vocab.encode(TEXT), 0.1, 0.1), vocab


@pytest.mark.parametrize(
    ("cell", "encoding", "last_only"),
    list(itertools.product(["lstm", "gru", "rnn"], ["embedding", "onehot", "scalar"], [False, True])),
)
def test_shapes_for_every_cell_input_and_objective(cell: str, encoding: str, last_only: bool) -> None:
    model = RecurrentLM(
        11, ModelParams(cell=cell, input=encoding, layers=2, hidden=12, embedding_dim=6, dropout=0.1)
    )
    tokens = torch.randint(0, 11, (3, 7))
    logits, state = model(tokens, last_only=last_only)
    assert logits.shape == ((3, 11) if last_only else (3, 7, 11))
    states = state if isinstance(state, tuple) else (state,)
    assert len(states) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (2, 3, 12) for s in states)
    again, _ = model(tokens[:, -1:], state)  # the state carries forward
    assert again.shape[-1] == 11


def test_weight_tying_shares_the_matrix() -> None:
    model = RecurrentLM(20, ModelParams(hidden=16, embedding_dim=16, tie_weights=True))
    assert model.head.weight is model.embedding.weight


def test_learning_rate_schedule() -> None:
    tp = tiny_params(train={"lr": 1.0, "warmup_steps": 10, "max_steps": 110, "min_lr_ratio": 0.1}).train
    assert lr_at(0, tp) == pytest.approx(0.1)
    assert lr_at(9, tp) == pytest.approx(1.0)
    assert lr_at(60, tp) == pytest.approx(0.55)
    assert lr_at(110, tp) == pytest.approx(0.1)
    # with a clock budget the decay follows whichever budget is spent first
    assert lr_at(20, tp, clock_progress=0.5) == pytest.approx(0.55)
    assert lr_at(20, tp, clock_progress=1.0) == pytest.approx(0.1)
    assert lr_at(60, tp, clock_progress=0.1) == pytest.approx(0.55)
    # the clock's cosine starts where warm-up ended, as the steps' one does
    assert progress_by_clock(trained_s=12.0, warmup_s=None, budget_s=100.0) == 0.0
    assert progress_by_clock(trained_s=12.0, warmup_s=12.0, budget_s=100.0) == 0.0
    assert progress_by_clock(trained_s=56.0, warmup_s=12.0, budget_s=100.0) == pytest.approx(0.5)
    assert progress_by_clock(trained_s=56.0, warmup_s=12.0, budget_s=math.inf) == 0.0


def test_a_clock_budget_stops_on_time_at_the_low_learning_rate(data, tmp_path: Path) -> None:
    splits, vocab = data
    params = tiny_params(train={"max_steps": 10**6, "max_minutes": 0.03, "eval_every": 10**5, "lr": 0.01})
    result = train(splits, vocab, params, tmp_path / "best.pt", tmp_path / "last.pt")
    assert result.stopped == "max_minutes" and result.steps < 10**6
    assert result.history[-1]["lr"] < 0.01 * 0.1 * 1.05  # min_lr_ratio 0.1 reached by the deadline


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"train": {"objective": "last"}},
        {"train": {"stateful": True}},
        {"model": {"cell": "gru", "input": "onehot"}},
        {"model": {"input": "scalar"}, "train": {"objective": "last"}},
    ],
    ids=["all", "last", "stateful", "gru-onehot", "scalar-last"],
)
def test_tiny_model_learns(data, tmp_path: Path, overrides: dict) -> None:
    splits, vocab = data
    steps = 300 if overrides.get("model", {}).get("input") == "scalar" else 60  # scalar input learns slowly
    train_overrides = {"max_steps": steps, "eval_every": steps, "lr": 0.02, **overrides.get("train", {})}
    params = tiny_params(**{**overrides, "train": train_overrides})
    result = train(splits, vocab, params, tmp_path / "best.pt", tmp_path / "last.pt")
    start = np.log(len(vocab))
    limit = 0.8 if params.model.input == "scalar" else 0.6
    assert result.train_loss_last < limit * start, (result.train_loss_last, start)
    assert result.window_val_loss_best < limit * start


def test_the_last_objective_predicts_the_token_after_the_window(tmp_path: Path) -> None:
    """On a cycle a, b, ..., h every next token differs from the current one, so a model trained on
    targets off by one (the window's own last token) would answer the window's last letter."""
    text = "abcdefgh" * 600
    vocab = build_vocabulary(text, "char", lowercase=False)
    splits = split_ids(vocab.encode(text), 0.1, 0.1)
    params = tiny_params(train={"objective": "last", "max_steps": 150, "eval_every": 150, "lr": 0.02})
    train(splits, vocab, params, tmp_path / "best.pt", tmp_path / "last.pt")
    model = load_model(tmp_path / "best.pt").model
    for window in ("abcdefgh" * 2, "cdefghab" * 2):
        logits, _ = model(torch.tensor([vocab.encode(window).tolist()]), last_only=True)
        assert vocab.decode([int(logits.argmax(-1))]) == window[0]  # the letter after the window's last


def test_same_params_same_metrics(data, tmp_path: Path) -> None:
    splits, vocab = data
    params = tiny_params(model={"dropout": 0.1, "layers": 2})
    first = train(splits, vocab, params, tmp_path / "a" / "best.pt", tmp_path / "a" / "last.pt")
    second = train(splits, vocab, params, tmp_path / "b" / "best.pt", tmp_path / "b" / "last.pt")
    assert [h["val_loss"] for h in first.history] == [h["val_loss"] for h in second.history]
    assert first.train_loss_last == second.train_loss_last


@pytest.mark.parametrize(
    "train_settings",
    [{"stateful": False}, {"stateful": True}, {"objective": "last", "grad_clip": 0.0}],
    ids=["stateless", "stateful", "last-objective"],
)
def test_resume_equals_uninterrupted(data, tmp_path: Path, train_settings: dict) -> None:
    """Dropout's and the batches' random streams, the carried state and the objective all come back
    with the checkpoint: the resumed run's weights equal the uninterrupted run's bit for bit."""
    splits, vocab = data
    params = tiny_params(model={"dropout": 0.1, "layers": 2}, train=train_settings)
    whole = train(splits, vocab, params, tmp_path / "w" / "best.pt", tmp_path / "w" / "last.pt")
    best, last = tmp_path / "r" / "best.pt", tmp_path / "r" / "last.pt"
    halted = train(splits, vocab, params, best, last, on_eval=lambda record: record["step"] == 20)
    assert halted.stopped == "requested" and halted.steps == 20
    best.unlink()  # DVC deletes stage outputs before re-running the stage
    resumed_params = with_settings(params, {"train.resume": True})
    resumed = train(splits, vocab, resumed_params, best, last)
    assert resumed.steps == whole.steps == 30
    assert resumed.train_loss_last == pytest.approx(whole.train_loss_last, abs=1e-6)
    assert resumed.window_val_loss_last == pytest.approx(whole.window_val_loss_last, abs=1e-6)
    assert resumed.window_val_loss_best == pytest.approx(whole.window_val_loss_best, abs=1e-6)
    assert best.is_file()
    exact = (torch.load(path, weights_only=True) for path in (last, tmp_path / "w" / "last.pt"))
    assert_same_training(*exact, exact=True)


def test_resume_without_a_checkpoint_names_the_file_and_the_way_out(data, tmp_path: Path) -> None:
    splits, vocab = data
    params = tiny_params(train={"resume": True})
    with pytest.raises(ResumeError, match=r"no checkpoint to resume at .*l\.pt; set train\.resume=false"):
        train(splits, vocab, params, tmp_path / "b.pt", tmp_path / "l.pt")


def test_resume_from_a_truncated_checkpoint_says_so_and_loads_nothing(data, tmp_path: Path) -> None:
    splits, vocab = data
    last = tmp_path / "l.pt"
    train(splits, vocab, tiny_params(train={"max_steps": 10}), tmp_path / "b.pt", last)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(
        ResumeError,
        match=r"l\.pt cannot be read: it is truncated or corrupted .*resume=false.*dvc checkout",
    ):
        train(splits, vocab, tiny_params(train={"resume": True}), tmp_path / "b.pt", last)


def test_resume_refuses_a_checkpoint_of_other_settings_naming_them(data, tmp_path: Path) -> None:
    splits, vocab = data
    last = tmp_path / "l.pt"
    train(splits, vocab, tiny_params(train={"max_steps": 10}), tmp_path / "b.pt", last)
    before = last.read_bytes()
    other = tiny_params(model={"hidden": 48}, train={"lr": 0.02, "resume": True, "max_steps": 40})
    with pytest.raises(
        ResumeError, match=r"other settings.*model\.hidden: 32 -> 48; train\.lr: 0\.01 -> 0\.02"
    ):
        train(splits, vocab, other, tmp_path / "b.pt", last)
    assert last.read_bytes() == before
    fewer_chars = build_vocabulary(TEXT.replace("z", ""), "char", lowercase=False)
    with pytest.raises(ResumeError, match="the vocabulary of data/prepared"):
        train(splits, fewer_chars, tiny_params(train={"resume": True}), tmp_path / "b.pt", last)


def test_resume_refuses_an_older_format_but_its_model_still_loads(data, tmp_path: Path) -> None:
    """Format 1 checkpoints came in several layouts of the training state; only their model is read."""
    splits, vocab = data
    best, last = tmp_path / "b.pt", tmp_path / "l.pt"
    train(splits, vocab, tiny_params(train={"max_steps": 10}), best, last)
    for path in (best, last):
        old = torch.load(path, map_location="cpu", weights_only=True)
        torch.save({**old, "format_version": 1}, path)
    with pytest.raises(
        ResumeError, match=r"checkpoint format 1, written by an older lstm-textgen.*resume=false"
    ):
        train(splits, vocab, tiny_params(train={"resume": True}), best, last)
    assert load_model(best).vocab == vocab


def test_checkpoint_round_trip_with_weights_only(data, tmp_path: Path) -> None:
    splits, vocab = data
    params = tiny_params()
    train(splits, vocab, params, tmp_path / "best.pt", tmp_path / "last.pt")
    raw = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "step", "best_val_loss", "params", "vocab"} <= set(raw)
    assert load_checkpoint(tmp_path / "best.pt")["step"] == raw["step"]
    loaded = load_model(tmp_path / "best.pt")
    assert loaded.vocab == vocab and loaded.params == params
    assert not loaded.model.training
    tokens = torch.as_tensor(vocab.encode("the quick"), dtype=torch.long)[None]
    logits, _ = loaded.model(tokens)
    assert logits.shape == (1, 9, len(vocab))
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}


def test_seq_len_longer_than_the_data_names_the_key(data, tmp_path: Path) -> None:
    splits, vocab = data
    with pytest.raises(UserError, match=r"data\.seq_len: 8000 is too long for the train split of 7200"):
        train(splits, vocab, tiny_params(data={"seq_len": 8000}), tmp_path / "b.pt", tmp_path / "l.pt")


def test_divergence_stops_with_step_and_advice(data, tmp_path: Path) -> None:
    splits, vocab = data
    params = tiny_params(
        train={"lr": 10.0, "warmup_steps": 0, "grad_clip": 0.0, "schedule": "constant"}, model={"cell": "rnn"}
    )
    with pytest.raises(TrainingError, match=r"loss .* at step \d+ .*lower train\.lr \(now 10\)"):
        train(splits, vocab, params, tmp_path / "b.pt", tmp_path / "l.pt")


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_sample_command_streams_and_repeats_with_a_seed(data, tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import tool_env

    splits, vocab = data
    train(splits, vocab, tiny_params(), tmp_path / "best.pt", tmp_path / "last.pt")
    command = [
        sys.executable,
        "-m",
        "lstm_textgen.apps.cli",
        "sample",
        "--checkpoint",
        str(tmp_path / "best.pt"),
        "--prompt",
        "the ",
        "--length",
        "40",
        "--seed",
        "3",
    ]
    first = subprocess.run(command, capture_output=True, text=True, env=tool_env(), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("the ") and len(first.stdout) == len("the ") + 40 + 1
    again = subprocess.run(command, capture_output=True, text=True, env=tool_env(), cwd=tmp_path)
    assert again.stdout == first.stdout
    bad = subprocess.run(
        [*command[:-6], "--prompt", "XYZ"], capture_output=True, text=True, env=tool_env(), cwd=tmp_path
    )
    assert bad.returncode == 2 and "not in the vocabulary: 'X', 'Y', 'Z'" in bad.stderr


def test_default_training_samples_well_from_a_short_prompt(tmp_path: Path) -> None:
    """The pitfall of stateful training with rare resets: near-random text from a zero state and a
    short prompt. Default training (random windows, each from a zero state) must not have it."""
    from lstm_textgen.inference.generation import Sampling, sample_texts

    text = "the quick brown fox jumps over the lazy dog. " * 300
    vocab = build_vocabulary(text, "char", lowercase=False)
    splits = split_ids(vocab.encode(text), 0.1, 0.1)
    params = tiny_params(train={"max_steps": 150, "eval_every": 150, "lr": 0.02})
    assert params.train.stateful is False and Params().train.stateful is False  # the default
    train(splits, vocab, params, tmp_path / "best.pt", tmp_path / "last.pt")
    model = load_model(tmp_path / "best.pt").model
    (text_out,) = sample_texts(model, vocab, ["the q"], length=60, sampling=Sampling(strategy="greedy"))
    assert text_out == text[5:65]  # "uick brown fox jumps over the lazy dog. the quick brown fox j"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_explicit_bf16_on_cpu_runs_or_fails_with_the_key_to_change(cell: str, data, tmp_path: Path) -> None:
    """oneDNN has no bf16 LSTM on CPUs without AVX-512: the stage must say so and name train.dtype,
    not crash in the first forward pass. Whichever this CPU is, the answer must match what a real
    training step does."""
    splits, vocab = data
    params = tiny_params(train={"dtype": "bfloat16", "max_steps": 2, "eval_every": 2}, model={"cell": cell})
    try:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            RecurrentLM(len(vocab), params.model)(torch.zeros(2, 5, dtype=torch.long))
        runs = True
    except RuntimeError:
        runs = False
    if runs:
        assert resolve_dtype("bfloat16", torch.device("cpu"), cell) == torch.bfloat16
        assert train(splits, vocab, params, tmp_path / "b.pt", tmp_path / "l.pt").dtype == "bfloat16"
    else:
        with pytest.raises(DeviceError, match=r"train\.dtype: bfloat16 .*use train\.dtype auto or float32"):
            train(splits, vocab, params, tmp_path / "b.pt", tmp_path / "l.pt")
        assert not (tmp_path / "b.pt").exists()
    assert resolve_dtype("auto", torch.device("cpu"), cell) in (torch.float32, torch.bfloat16)


def test_float16_trains_with_a_gradient_scaler_and_resumes_exactly(data, tmp_path: Path) -> None:
    """fp16 autocast pairs with a GradScaler (small gradients would underflow without it); its state
    is part of the checkpoint, so a resumed fp16 run equals an uninterrupted one."""
    splits, vocab = data
    try:
        resolve_dtype("float16", torch.device("cpu"), "gru")
    except DeviceError:
        pytest.skip("this CPU runs no float16 GRU")
    params = tiny_params(model={"cell": "gru"}, train={"dtype": "float16", "lr": 0.02, "max_steps": 60})
    whole = train(splits, vocab, params, tmp_path / "w" / "best.pt", tmp_path / "w" / "last.pt")
    assert whole.dtype == "float16"
    assert whole.train_loss_last < 0.6 * math.log(len(vocab))
    scaler = load_checkpoint(tmp_path / "w" / "last.pt")["grad_scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    best, last = tmp_path / "r" / "best.pt", tmp_path / "r" / "last.pt"
    train(splits, vocab, params, best, last, on_eval=lambda record: record["step"] == 30)
    resumed_params = with_settings(params, {"train.resume": True})
    resumed = train(splits, vocab, resumed_params, best, last)
    assert resumed.train_loss_last == whole.train_loss_last
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in whole.history]


def test_a_compile_that_fails_falls_back_to_the_plain_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from lstm_textgen.train.setup import Compiled

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(torch, "compile", lambda module: broken)
    model = RecurrentLM(5, ModelParams(hidden=8, embedding_dim=4))
    forward = Compiled(model)
    inputs = torch.zeros(2, 3, dtype=torch.long)
    with pytest.warns(UserWarning, match="train.compile: torch.compile failed"):
        logits, _ = forward(inputs)
    assert torch.equal(logits, model(inputs)[0]) and forward.compiled is model

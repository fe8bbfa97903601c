"""Evaluation over a whole split, with the same windowing for every model so runs are comparable.

Two numbers per split, both over every token the windows cover:
- stateful: the split is cut into `batch_size` contiguous streams read window after window with the
  recurrent state carried across windows, so every prediction sees all earlier text of its stream
  (the headline figure, as a language model is used when generating);
- stateless: non-overlapping windows of `evaluate.seq_len` tokens, each from a zero state (early
  positions see little context, so this is higher; it is what a windowed training objective sees).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from lstm_textgen.data.windows import check_fits
from lstm_textgen.devices import autocast, to_device, to_device_tokens
from lstm_textgen.errors import UserError
from lstm_textgen.model.recurrent import RecurrentLM, State, detach_state

if TYPE_CHECKING:
    from lstm_textgen.data.dataset import Dataset
    from lstm_textgen.data.tokenisers import Vocabulary


def _summary(loss_sum: float, correct: int, count: int) -> dict[str, float]:
    loss = loss_sum / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_token": loss / math.log(2),
        "accuracy": correct / count,
        "tokens": float(count),
    }


class Tally:
    """Nats and correct predictions summed on the device (float64, as Python's floats would), read
    once at the end: a `.item()` per batch would make the host wait for the GPU at every batch."""

    def __init__(self, device: torch.device) -> None:
        self.nats = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        flat = logits.float().reshape(-1, logits.shape[-1])
        self.nats += F.cross_entropy(flat, targets.reshape(-1), reduction="sum").double()
        self.correct += (flat.argmax(-1) == targets.reshape(-1)).sum()

    def read(self) -> tuple[float, int]:
        return self.nats.item(), int(self.correct.item())


def evenly_spaced_starts(length: int, seq_len: int, count: int) -> torch.Tensor:
    """`count` window starts spread evenly from 0 to the last window that fits in `length` tokens, in
    integer arithmetic: float32 (torch.linspace) rounds past the end on splits of 2**24 tokens and more."""
    last = length - seq_len - 1
    if count <= 1:
        return torch.zeros(max(count, 0), dtype=torch.int64)
    return torch.arange(count, dtype=torch.int64) * last // (count - 1)


@torch.no_grad()
def evaluate_stateless(
    model: RecurrentLM, ids: np.ndarray, seq_len: int, batch_size: int, dtype: torch.dtype = torch.float32
) -> dict[str, float]:
    device = next(model.parameters()).device
    check_fits(len(ids), seq_len, "evaluation")
    tokens = to_device_tokens(ids, device)
    windows = (len(tokens) - 1) // seq_len
    offsets = torch.arange(seq_len + 1, device=device)
    tally, count = Tally(device), 0
    for starts in (torch.arange(windows, device=device) * seq_len).split(batch_size):
        chunk = tokens[starts[:, None] + offsets].long()
        with autocast(device, dtype):
            logits, _ = model(chunk[:, :-1])
        tally.add(logits, chunk[:, 1:])
        count += chunk[:, 1:].numel()
    return _summary(*tally.read(), count)


@torch.no_grad()
def evaluate_stateful(
    model: RecurrentLM, ids: np.ndarray, seq_len: int, batch_size: int, dtype: torch.dtype = torch.float32
) -> dict[str, float]:
    check_fits(len(ids), seq_len, "evaluation")
    loss_sum, correct, count, _ = stateful_pass(model, ids, seq_len, batch_size, dtype=dtype)
    return _summary(loss_sum, correct, count)


@torch.no_grad()
def stateful_pass(
    model: RecurrentLM,
    ids: np.ndarray,
    seq_len: int,
    batch_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    keep_logprobs: bool = False,
) -> tuple[float, int, int, torch.Tensor | None]:
    """The text as up to `batch_size` contiguous streams read window after window, state carried:
    (nats, correct, predictions, each prediction's log-probability in text order or None). Tokens
    1 .. predictions are predicted, in order, each from its stream's text before it (a stream starts
    from a zero state); the last (len - 1) % streams tokens are not. Needs at least two tokens."""
    device = next(model.parameters()).device
    streams = max(1, min(batch_size, (len(ids) - 1) // seq_len))
    stream_len = (len(ids) - 1) // streams
    tokens = to_device_tokens(ids, device)  # narrow ids; each window widened to int64 on its own
    inputs = tokens[: streams * stream_len].view(streams, stream_len)
    targets = tokens[1 : streams * stream_len + 1].view(streams, stream_len)
    state: State | None = None
    tally, logprobs = Tally(device), []
    for start in range(0, stream_len, seq_len):
        window = targets[:, start : start + seq_len].long()
        with autocast(device, dtype):
            logits, state = model(inputs[:, start : start + seq_len].long(), state)
        state = detach_state(state)
        tally.add(logits, window)
        if keep_logprobs:
            logprobs.append(logits.float().log_softmax(-1).gather(-1, window[..., None])[..., 0])
    kept = torch.cat(logprobs, dim=1).reshape(-1).cpu() if keep_logprobs else None
    loss_sum, correct = tally.read()
    return loss_sum, correct, streams * stream_len, kept


@torch.no_grad()
def periodic_validation_loss(
    model: RecurrentLM,
    tokens: torch.Tensor,
    seq_len: int,
    *,
    num_windows: int,
    batch_size: int,
    last_only: bool,
    dtype: torch.dtype,
) -> float:
    """The training loop's estimate: mean loss (nats/token) over `num_windows` evenly spaced windows,
    each from a zero state; the same windows at every evaluation, so the curve is smooth."""
    was_training = model.training
    model.eval()
    offsets = torch.arange(seq_len + 1, device=tokens.device)
    all_starts = to_device(evenly_spaced_starts(len(tokens), seq_len, num_windows), tokens.device)
    tally, count = Tally(tokens.device), 0
    for starts in all_starts.split(batch_size):
        chunk = tokens[starts[:, None] + offsets].long()
        with autocast(tokens.device, dtype):
            logits, _ = model(chunk[:, :-1], last_only=last_only)
        targets = chunk[:, -1] if last_only else chunk[:, 1:]
        tally.add(logits, targets)
        count += targets.numel()
    model.train(was_training)
    return tally.read()[0] / count


def evaluate_splits(
    model: RecurrentLM,
    splits: dict[str, np.ndarray],
    seq_len: int,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """{'val': {...}, 'test': {...}}, each with stateful figures and `stateless_*` ones. The evaluate
    stage reads in float32 (inference is cheap): reduced precision would make the figures depend on
    the machine's kernels."""
    results: dict[str, Any] = {}
    for name in ("val", "test"):
        if len(splits[name]) < seq_len + 1:
            continue
        stateful = evaluate_stateful(model, splits[name], seq_len, batch_size, dtype)
        stateless = evaluate_stateless(model, splits[name], seq_len, batch_size, dtype)
        results[name] = {**stateful, **{f"stateless_{k}": v for k, v in stateless.items() if k != "tokens"}}
    return results


def bits_per_character(bits_per_token: float, characters_per_token: float | None) -> float | None:
    """Bits per token over the characters each token stands for: the figure that compares runs across
    levels (char, word, byte, BPE). None where the prepared data predates the count of characters."""
    return bits_per_token / characters_per_token if characters_per_token else None


def evaluate_dataset(model: RecurrentLM, dataset: Dataset, seq_len: int, batch_size: int) -> dict[str, Any]:
    """`evaluate_splits` of the prepared dataset, with bits per character (stateful and stateless)
    wherever the dataset knows its characters per token."""
    results = evaluate_splits(model, dataset.splits, seq_len, batch_size)
    for name, figures in results.items():
        for kind in ("", "stateless_"):
            bits = bits_per_character(figures[f"{kind}bits_per_token"], dataset.characters_per_token(name))
            if bits is not None:
                figures[f"{kind}bits_per_character"] = bits
    return results


def check_same_vocabulary(
    model_vocab: Vocabulary, dataset: Dataset, model_path: Path, prepared: Path
) -> None:
    """A model's figures on data of another vocabulary would be meaningless: refuse, naming the fix."""
    if model_vocab != dataset.vocab:
        raise UserError(
            f"{model_path} was trained on another vocabulary ({len(model_vocab)} tokens) than "
            f"{prepared} holds ({len(dataset.vocab)}): its figures would be meaningless; "
            "run `dvc repro train` to train on the prepared data"
        )

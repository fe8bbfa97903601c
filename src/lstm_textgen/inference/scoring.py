"""How likely a model finds a text: total nats, bits per character and per token, perplexity and, on
request, every token's log-probability. One function for `lstm-textgen score`, the served model's
`task=score` and the tests.

The text is read exactly as evaluate reads a split (`evaluation.stateful_pass`: up to
`evaluate.batch_size` contiguous streams, windows of `evaluate.seq_len`, state carried), so the score
of the validation split's text is evaluate's validation loss. A short text is one stream: every token
but the first is predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.devices import autocast
from lstm_textgen.errors import UserError
from lstm_textgen.inference.evaluation import stateful_pass
from lstm_textgen.inference.generation import PromptError, UnknownPolicy, encode_prompt
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.params import EvaluateParams


@dataclass(frozen=True)
class TextScore:
    tokens: int  # tokens of the text (after the unknown-token policy)
    predicted: int  # tokens the model predicted (not the first of each stream)
    characters: int  # characters those predicted tokens stand for
    nats: float  # -log p of the predicted tokens, summed
    unknown: int  # tokens of the text outside the vocabulary (skipped, replaced or <unk>)
    token_logprobs: list[tuple[str, float]] | None = None  # (token's text, natural log-probability)
    token_ids: list[int] | None = None  # with token_logprobs: every token of the text, the first too

    @property
    def bits_per_token(self) -> float:
        return self.nats / self.predicted / math.log(2)

    @property
    def bits_per_character(self) -> float:
        return self.nats / max(1, self.characters) / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.nats / self.predicted, 50.0))

    def figures(self) -> dict[str, float | int]:
        return {
            "tokens": self.tokens,
            "predicted": self.predicted,
            "characters": self.characters,
            "nats": self.nats,
            "bits_per_character": self.bits_per_character,
            "bits_per_token": self.bits_per_token,
            "perplexity": self.perplexity,
            "unknown": self.unknown,
        }


def encode_text(
    text: str, vocab: Vocabulary, unknown: UnknownPolicy = "error", replacement: str | None = None
) -> tuple[list[int], int]:
    """The text's ids (tokens outside the vocabulary follow `unknown`, as a prompt's do) and how many
    tokens were outside it."""
    try:
        ids = encode_prompt(text, vocab, unknown, replacement)
    except PromptError as exc:
        message = (
            str(exc).replace("prompt", "text").replace("sample.unknown", "sample.unknown (or --unknown)")
        )
        raise UserError(message) from None
    if len(ids) < 2:
        raise UserError(f"a text needs at least two tokens to be scored, got {len(ids)}")
    return ids, sum(1 for t in vocab.tokenize(vocab.normalise(text)) if t not in vocab)


def text_score(
    vocab: Vocabulary,
    ids: list[int],
    *,
    outside: int,
    nats: float,
    predicted: int,
    logprobs: torch.Tensor | None,
) -> TextScore:
    """The figures of a text whose tokens 1 .. predicted scored `nats` in all (`logprobs` each)."""
    targets = ids[1 : predicted + 1]
    characters = int(vocab.character_counts[np.asarray(targets, dtype=np.int64)].sum())
    if logprobs is None:
        return TextScore(len(ids), predicted, characters, nats, outside)
    listed = [(vocab.decode([t]), float(lp)) for t, lp in zip(targets, logprobs.tolist(), strict=True)]
    return TextScore(len(ids), predicted, characters, nats, outside, listed, ids)


@torch.no_grad()
def score_text(
    model: RecurrentLM,
    vocab: Vocabulary,
    text: str,
    *,
    windows: EvaluateParams,
    dtype: torch.dtype = torch.float32,
    unknown: UnknownPolicy = "error",
    replacement: str | None = None,
    per_token: bool = False,
) -> TextScore:
    """Score `text`; tokens outside the vocabulary follow `unknown` as a prompt's do."""
    ids, outside = encode_text(text, vocab, unknown, replacement)
    nats, _, predicted, logprobs = stateful_pass(
        model,
        np.asarray(ids, dtype=vocab.dtype),
        windows.seq_len,
        windows.batch_size,
        dtype=dtype,
        keep_logprobs=per_token,
    )
    return text_score(
        vocab, ids, outside=outside, nats=nats, predicted=predicted, logprobs=logprobs
    )  # None unless per_token


def one_stream(length: int, windows: EvaluateParams) -> bool:
    """Whether `stateful_pass` reads a text of `length` tokens as a single stream (a short text)."""
    return (length - 1) // windows.seq_len <= 1 or windows.batch_size == 1


@torch.no_grad()
def score_texts(
    model: RecurrentLM,
    vocab: Vocabulary,
    texts: list[str],
    *,
    windows: EvaluateParams,
    dtype: torch.dtype = torch.float32,
    unknown: UnknownPolicy = "error",
    replacement: str | None = None,
    per_token: bool = False,
) -> list[TextScore]:
    """`score_text` of each text, the short ones in one pass: they are read side by side, padded to
    the longest, window by window with state carried, each row's predictions masked at its end (a
    recurrent row never sees what follows it). Long texts, read as several streams, go alone."""
    encoded = [encode_text(text, vocab, unknown, replacement) for text in texts]
    short = [i for i, (ids, _) in enumerate(encoded) if one_stream(len(ids), windows)]
    scores: dict[int, TextScore] = {}
    if short:
        figures = side_by_side(model, [encoded[i][0] for i in short], windows.seq_len, dtype)
        for i, (nats, logprobs) in zip(short, figures, strict=True):
            ids, outside = encoded[i]
            scores[i] = text_score(
                vocab,
                ids,
                outside=outside,
                nats=nats,
                predicted=len(ids) - 1,
                logprobs=logprobs if per_token else None,
            )
    for i, text in enumerate(texts):
        if i not in scores:
            scores[i] = score_text(
                model,
                vocab,
                text,
                windows=windows,
                dtype=dtype,
                unknown=unknown,
                replacement=replacement,
                per_token=per_token,
            )
    return [scores[i] for i in range(len(texts))]


def side_by_side(
    model: RecurrentLM, texts: list[list[int]], seq_len: int, dtype: torch.dtype
) -> list[tuple[float, torch.Tensor]]:
    """Each text as one stream, all in one batch: (nats, each prediction's log-probability)."""
    device = next(model.parameters()).device
    longest = max(len(ids) for ids in texts)
    padded = torch.zeros(len(texts), longest, dtype=torch.long)
    for row, ids in enumerate(texts):
        padded[row, : len(ids)] = torch.tensor(ids)
    padded = padded.to(device)
    state, pieces = None, []
    for start in range(0, longest - 1, seq_len):
        end = min(start + seq_len, longest - 1)
        with autocast(device, dtype):
            logits, state = model(padded[:, start:end], state)
        targets = padded[:, start + 1 : end + 1, None]
        pieces.append(logits.float().log_softmax(-1).gather(-1, targets)[..., 0])
    logprobs = torch.cat(pieces, dim=1).cpu()
    kept = [logprobs[row, : len(ids) - 1] for row, ids in enumerate(texts)]
    return [(float(-row.double().sum()), row) for row in kept]


def score_loaded(
    loaded: Any, text: str, per_token: bool = False, unknown: UnknownPolicy | None = None
) -> TextScore:
    """`score_text` with a loaded model's own windows and unknown-token policy (`unknown` overrides the
    policy), in float32 as evaluate reads a split: what the command, the served model and the demo
    score with, so a text scores the same on every machine."""
    sample = loaded.params.sample
    return score_text(
        loaded.model,
        loaded.vocab,
        text,
        windows=loaded.params.evaluate,
        dtype=torch.float32,
        unknown=unknown or sample.unknown,
        replacement=sample.replacement,
        per_token=per_token,
    )


def character_surprisal(vocab: Vocabulary, score: TextScore) -> list[tuple[str, float | None]]:
    """The scored text as (piece, bits per character) pairs, for colouring each character by how
    surprised the model was. A token's bits are spread evenly over the characters it completes: at
    byte and BPE level a character may take several tokens, at word level a word's bits cover its
    letters and the space before it. Tokens with no prediction (the first) get None."""
    if score.token_ids is None or score.token_logprobs is None:
        raise ValueError("score the text with per_token=True first")
    text = vocab.detokenizer()
    bits = [None, *(-lp / math.log(2) for _, lp in score.token_logprobs)]
    bits += [None] * (len(score.token_ids) - len(bits))
    pieces: list[tuple[str, float | None]] = []
    pending: float | None = None
    for token, token_bits in zip(score.token_ids, bits, strict=True):
        if token_bits is not None:
            pending = (pending or 0.0) + token_bits
        piece = text.push(int(token))
        if piece:
            pieces.append((piece, None if pending is None else pending / len(piece)))
            pending = None
    tail = text.finish()
    if tail:
        pieces.append((tail, None if pending is None else pending / len(tail)))
    return pieces


def score_row(score: TextScore) -> dict[str, Any]:
    """One served row: the figures, and the per-token list as JSON-friendly pairs when asked."""
    row: dict[str, Any] = dict(score.figures())
    if score.token_logprobs is not None:
        row["token_logprobs"] = [[token, logprob] for token, logprob in score.token_logprobs]
    return row

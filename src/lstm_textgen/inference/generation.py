"""Text generation: encode the prompts, run them through the model's batcher (`batcher.py`: the
state is warmed on each prompt once, then every row advances one token per step, no re-feeding of a
window), turn the tokens back into text.

Strategies (`drawing.py`): greedy (argmax), temperature sampling, top-k, top-p (nucleus) and "mode of
N draws". These functions serve the sample stage and the command line; the served model and the demo
share one running batcher per model. The settings and their defaults are `params.Sampling`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.errors import UserError
from lstm_textgen.inference.batcher import RowBatcher
from lstm_textgen.inference.rows import BatchLimits, Row
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.params import Sampling, text_problem

UnknownPolicy = Literal["error", "skip", "replace"]


class PromptError(UserError):
    """A prompt cannot be encoded with the model's vocabulary."""


def encode_prompt(
    prompt: str, vocab: Vocabulary, unknown: UnknownPolicy = "error", replacement: str | None = None
) -> list[int]:
    """Prompt -> ids; tokens outside the vocabulary follow `unknown` (error, skip or replace)."""
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}")
    if problem := text_problem(prompt):
        raise PromptError(f"prompt {problem}")
    tokens = vocab.tokenize(vocab.normalise(prompt))
    missing = sorted({t for t in tokens if t not in vocab})
    if missing and unknown != "replace":
        if unknown == "error":
            sample = "".join(sorted(t for t in vocab.tokens if len(t) == 1 and t.isprintable()))
            raise PromptError(
                f"prompt has {len(missing)} token(s) not in the vocabulary: "
                + ", ".join(repr(t) for t in missing[:20])
                + f". The vocabulary has {len(vocab)} tokens"
                + (f" ({sample[:100]})" if vocab.level == "char" else "")
                + "; set sample.unknown to skip or replace"
            )
        if unknown == "skip":
            tokens = [t for t in tokens if t in vocab]
    if missing and unknown == "replace":
        substitute = vocab.unknown if vocab.level == "word" else replacement
        if substitute is None or substitute not in vocab:
            raise PromptError(f"sample.replacement {substitute!r} is not in the vocabulary")
        tokens = [t if t in vocab else substitute for t in tokens]
    if not tokens:
        raise PromptError("the prompt is empty (after dropping unknown tokens)")
    return [int(i) for i in vocab.encode_tokens(tokens)]


def generate(
    model: RecurrentLM, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling
) -> list[list[int]]:
    """New token ids for each prompt; each row as it would be alone (its own random stream)."""
    if max_new_tokens < 1:
        return [[] for _ in prompt_ids]
    rows = [Row(ids, max_new_tokens, sampling) for ids in prompt_ids]
    return RowBatcher(model, BatchLimits(active_rows=len(rows), waiting_rows=0)).run(rows)


def stream_text(
    model: RecurrentLM, vocab: Vocabulary, prompt_ids: Sequence[int], length: int, sampling: Sampling
) -> Iterator[str]:
    """One prompt's continuation, piece by piece as it is drawn (the command line and the web demo
    print it as it grows); joined, the pieces equal `sample_texts`' text for the same seed."""
    if length >= 1:
        yield from stream_row(vocab, prompt_ids, RowBatcher(model).follow(Row(prompt_ids, length, sampling)))


def stream_row(vocab: Vocabulary, prompt_ids: Sequence[int], tokens: Iterator[int]) -> Iterator[str]:
    """A row's tokens as text pieces: word spacing, whole UTF-8 characters."""
    text = vocab.detokenizer(prompt_ids[-1])
    for token in tokens:
        piece = text.push(int(token))
        if piece:
            yield piece
    tail = text.finish()
    if tail:
        yield tail


def sample_texts(
    model: RecurrentLM,
    vocab: Vocabulary,
    prompts: Sequence[str],
    *,
    length: int,
    sampling: Sampling,
    unknown: UnknownPolicy = "error",
    replacement: str | None = None,
) -> list[str]:
    """Prompts -> generated continuations as readable text (words joined at word level, whole UTF-8
    characters at byte and BPE level)."""
    ids = [encode_prompt(p, vocab, unknown, replacement) for p in prompts]
    generated = generate(model, ids, length, sampling)
    return [continuation(vocab, prompt_ids, g) for prompt_ids, g in zip(ids, generated, strict=True)]


def continuation(vocab: Vocabulary, prompt_ids: Sequence[int], generated: Sequence[int]) -> str:
    """The text `generated` adds after the prompt: spaced against the prompt's last token."""
    text = vocab.detokenizer(prompt_ids[-1])
    return "".join(text.push(int(token)) for token in generated) + text.finish()

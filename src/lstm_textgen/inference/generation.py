"""Text generation: warm the recurrent state on the prompt once, then carry it forward one token at a
time (no re-feeding the window), batched over prompts, on any device.

Strategies: greedy (argmax), temperature sampling, top-k, top-p (nucleus) and "mode of N draws"
(draw N tokens from the softmax and keep the most frequent, as the Tiny Shakespeare notebook does).
One function serves the sample stage, the command line and the served model; the settings and their
defaults are `params.Sampling`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.errors import UserError
from lstm_textgen.model.recurrent import RecurrentLM, State
from lstm_textgen.params import Sampling

UnknownPolicy = Literal["error", "skip", "replace"]


class PromptError(UserError):
    """A prompt cannot be encoded with the model's vocabulary."""


def filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p: tokens outside the allowed set get -inf."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = (
            cumulative - torch.softmax(sorted_logits, dim=-1) >= sampling.top_p
        )  # keep the first crossing
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids."""
    if sampling.strategy == "greedy":
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, sampling), dim=-1)
    if sampling.strategy == "mode":
        draws = torch.multinomial(probs, sampling.draws, replacement=True, generator=generator)
        return torch.mode(draws, dim=-1).values
    return draw_one(probs, generator)


def draw_one(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row by inverting the cumulative distribution: one uniform number per row where
    `torch.multinomial` draws one per vocabulary entry."""
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=torch.float32)
    return invert_cdf(probs, u)


def invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B, V] probabilities, [B, 1] uniforms in [0, 1) -> [B] ids. The point stays strictly below
    the total mass, so a token of probability zero is never picked, even for u = 0 or u near 1."""
    cdf = probs.float().cumsum(dim=-1)
    total = cdf[:, -1:]
    point = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(-1)


def encode_prompt(
    prompt: str, vocab: Vocabulary, unknown: UnknownPolicy = "error", replacement: str | None = None
) -> list[int]:
    """Prompt -> ids; tokens outside the vocabulary follow `unknown` (error, skip or replace)."""
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}")
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


@torch.inference_mode()
def generation_steps(
    model: RecurrentLM, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling
) -> Iterator[torch.Tensor]:
    """Each step's [B] new token ids, as soon as they are drawn. The state is warmed on each prompt
    (its own length), then all prompts advance together, one token per step."""
    model.eval()
    device = next(model.parameters()).device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    logits, state = warm_up(model, prompt_ids, device)
    step = model.stepper(state)
    for position in range(max_new_tokens):
        token = next_tokens(logits, sampling, generator)
        yield token
        if position < max_new_tokens - 1:
            logits = step(token)


def generate(
    model: RecurrentLM, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling
) -> list[list[int]]:
    """New token ids for each prompt."""
    out = list(generation_steps(model, prompt_ids, max_new_tokens, sampling))
    if not out:
        return [[] for _ in prompt_ids]
    return torch.stack(out, dim=1).tolist()


def stream_text(
    model: RecurrentLM, vocab: Vocabulary, prompt_ids: Sequence[int], length: int, sampling: Sampling
) -> Iterator[str]:
    """One prompt's continuation, piece by piece as it is drawn (the command line and the web demo
    print it as it grows); joined, the pieces equal `sample_texts`' text for the same seed."""
    text = vocab.detokenizer(prompt_ids[-1])  # word spacing, whole UTF-8 characters
    for token in generation_steps(model, [prompt_ids], length, sampling):
        piece = text.push(int(token[0]))
        if piece:
            yield piece
    tail = text.finish()
    if tail:
        yield tail


def sample_texts(
    model: RecurrentLM,
    vocab: Vocabulary,
    prompts: Sequence[str],
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

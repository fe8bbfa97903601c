"""Choosing the next token of many rows at once, each row with its own settings and its own random
stream, so that a row draws the same tokens whether it steps alone or beside others.

Strategies: greedy (argmax), temperature sampling with top-k and top-p (nucleus), and "mode of N
draws" (draw N tokens and keep the most frequent, as the Tiny Shakespeare notebook does). The work is
vectorised over the rows that share a strategy; what differs per row (temperature, k, p) is a column.
A row's random numbers come from its own `random.Random(seed)`: one uniform per drawn token, taken
by inverting the cumulative distribution, so no row's draw consumes another row's numbers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lstm_textgen.params import Sampling


def row_random(sampling: Sampling) -> random.Random:
    """A row's own random stream: seeded, or from the operating system's entropy when unseeded."""
    return random.Random(sampling.seed)


@dataclass(frozen=True)
class SampledRows:
    """The rows of a batch that sample, with their settings as [S, 1] columns. `top_k` and `top_p`
    are None when no row uses them; a row without them gets a value that filters nothing."""

    index: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None


@dataclass(frozen=True)
class DrawPlan:
    """Which rows use which strategy: made once each time the batch's rows change, not every step."""

    greedy: torch.Tensor
    sampled: SampledRows | None
    mode: tuple[int, ...]
    mode_draws: tuple[int, ...]
    settings: tuple[Sampling, ...]


def plan_draws(settings: Sequence[Sampling], device: torch.device | str = "cpu") -> DrawPlan:
    """The rows' strategies and settings as index tensors and columns."""
    by = {
        name: [i for i, s in enumerate(settings) if s.strategy == name]
        for name in ("greedy", "sample", "mode")
    }
    sampled = None
    if by["sample"]:
        rows = [settings[i] for i in by["sample"]]
        column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)[:, None]  # noqa: E731
        has_k, has_p = any(s.top_k for s in rows), any(s.top_p is not None and s.top_p < 1 for s in rows)
        sampled = SampledRows(
            index=torch.tensor(by["sample"], dtype=torch.long, device=device),
            temperature=column([s.temperature for s in rows], torch.float32),
            top_k=column([s.top_k or 0 for s in rows], torch.long) if has_k else None,
            top_p=column(
                [s.top_p if s.top_p is not None and s.top_p < 1 else 2.0 for s in rows], torch.float32
            )
            if has_p
            else None,
        )
    return DrawPlan(
        greedy=torch.tensor(by["greedy"], dtype=torch.long, device=device),
        sampled=sampled,
        mode=tuple(by["mode"]),
        mode_draws=tuple(settings[i].draws for i in by["mode"]),
        settings=tuple(settings),
    )


def filtered_probabilities(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """[R, V] logits -> probabilities after temperature, then top-k, then top-p, per row. A top_k of
    0 and a top_p above 1 leave a row unfiltered."""
    logits = logits.float() / temperature
    if top_k is not None:
        widest = int(top_k.max())
        if widest < logits.shape[-1]:
            kth = torch.topk(logits, widest, dim=-1).values.gather(-1, (top_k - 1).clamp(min=0))
            kth = torch.where(top_k > 0, kth, torch.full_like(kth, float("-inf")))
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # keep the first crossing
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.softmax(logits, dim=-1)


def invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B, V] probabilities, [B, N] uniforms in [0, 1) -> [B, N] ids. The point stays strictly below
    the total mass, so a token of probability zero is never picked, even for u = 0 or u near 1."""
    cdf = probs.float().cumsum(dim=-1)
    total = cdf[:, -1:]
    point = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True)


def uniforms(randoms: Sequence[random.Random], count: int, device: torch.device) -> torch.Tensor:
    """[len(randoms), count] uniforms, each row from its own stream."""
    values = [[r.random() for _ in range(count)] for r in randoms]
    return torch.tensor(values, dtype=torch.float32, device=device)


def draw(logits: torch.Tensor, plan: DrawPlan, randoms: Sequence[random.Random]) -> torch.Tensor:
    """[B, V] logits -> [B] next token ids, each row by its own strategy, settings and stream."""
    rows = plan.sampled
    if rows is not None and len(rows.index) == logits.shape[0]:  # every row samples: no gather
        probs = filtered_probabilities(logits, rows.temperature, rows.top_k, rows.top_p)
        return invert_cdf(probs, uniforms(randoms, 1, logits.device))[:, 0]
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if plan.greedy.numel():
        tokens[plan.greedy] = logits[plan.greedy].argmax(dim=-1)
    if plan.sampled is not None:
        rows = plan.sampled
        probs = filtered_probabilities(logits[rows.index], rows.temperature, rows.top_k, rows.top_p)
        u = uniforms([randoms[i] for i in rows.index.tolist()], 1, logits.device)
        tokens[rows.index] = invert_cdf(probs, u)[:, 0]
    for row, draws in zip(plan.mode, plan.mode_draws, strict=True):
        tokens[row] = mode_of_draws(logits[row : row + 1], plan.settings[row], randoms[row], draws)
    return tokens


def mode_of_draws(logits: torch.Tensor, sampling: Sampling, rng: random.Random, draws: int) -> torch.Tensor:
    """[1, V] logits -> the most frequent of `draws` draws (the lowest id among ties)."""
    column = lambda value, dtype: torch.tensor([[value]], dtype=dtype, device=logits.device)  # noqa: E731
    probs = filtered_probabilities(
        logits,
        column(sampling.temperature, torch.float32),
        column(sampling.top_k or 0, torch.long) if sampling.top_k else None,
        column(sampling.top_p, torch.float32) if sampling.top_p is not None and sampling.top_p < 1 else None,
    )
    picks = invert_cdf(probs, uniforms([rng], draws, logits.device))[0]
    return torch.bincount(picks, minlength=logits.shape[-1]).argmax()

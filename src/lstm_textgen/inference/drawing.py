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
class RowSettings:
    """Some rows of a batch (`index`), with their settings as [R, 1] columns. `top_k` and `top_p`
    are None when none of them uses it; a row without it gets a value that filters nothing."""

    index: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None


def row_settings(
    settings: Sequence[Sampling], rows: list[int], device: torch.device | str
) -> RowSettings | None:
    """The settings of `rows` as columns (None for no rows)."""
    if not rows:
        return None
    chosen = [settings[i] for i in rows]
    column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)[:, None]  # noqa: E731
    nucleus = [s.top_p if s.top_p is not None and s.top_p < 1 else 2.0 for s in chosen]
    return RowSettings(
        index=torch.tensor(rows, dtype=torch.long, device=device),
        temperature=column([s.temperature for s in chosen], torch.float32),
        top_k=column([s.top_k or 0 for s in chosen], torch.long) if any(s.top_k for s in chosen) else None,
        top_p=column(nucleus, torch.float32) if any(p <= 1 for p in nucleus) else None,
    )


@dataclass(frozen=True)
class DrawPlan:
    """Which rows use which strategy: made once each time the batch's rows change, not every step."""

    greedy: torch.Tensor
    sampled: RowSettings | None
    mode: RowSettings | None


def plan_draws(settings: Sequence[Sampling], device: torch.device | str = "cpu") -> DrawPlan:
    """The rows' strategies and settings as index tensors and columns."""
    by = {
        name: [i for i, s in enumerate(settings) if s.strategy == name]
        for name in ("greedy", "sample", "mode")
    }
    return DrawPlan(
        greedy=torch.tensor(by["greedy"], dtype=torch.long, device=device),
        sampled=row_settings(settings, by["sample"], device),
        mode=row_settings(settings, by["mode"], device),
    )


def filtered_probabilities(logits: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """[R, V] logits of `rows` -> probabilities after temperature, then top-k, then top-p, per row.
    A top_k of 0 and a top_p above 1 leave a row unfiltered."""
    temperature, top_k, top_p = rows.temperature, rows.top_k, rows.top_p
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


def take_uniforms(settings: Sequence[Sampling], randoms: Sequence[random.Random]) -> list[list[float]]:
    """Each row's uniforms for this step, from its own stream: none for greedy, one for sample,
    `draws` for mode. Taken before any arithmetic, so a step that fails can be redrawn row by row
    with the same numbers (no row's stream moves twice)."""
    counts = {"greedy": 0, "sample": 1}
    return [
        [r.random() for _ in range(counts.get(s.strategy, s.draws))]
        for s, r in zip(settings, randoms, strict=True)
    ]


def _column(values: list[list[float]], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def draw(
    logits: torch.Tensor, plan: DrawPlan, settings: Sequence[Sampling], randoms: Sequence[random.Random]
) -> torch.Tensor:
    """[B, V] logits -> [B] next token ids, each row by its own strategy, settings and stream."""
    return draw_with(logits, plan, take_uniforms(settings, randoms))


def draw_with(logits: torch.Tensor, plan: DrawPlan, u: Sequence[Sequence[float]]) -> torch.Tensor:
    """`draw` with each row's uniforms already taken (`take_uniforms`)."""
    rows, device = plan.sampled, logits.device
    if rows is not None and len(rows.index) == logits.shape[0]:  # every row samples: no gather
        return invert_cdf(filtered_probabilities(logits, rows), _column(list(u), device))[:, 0]
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=device)
    if plan.greedy.numel():
        tokens[plan.greedy] = logits[plan.greedy].argmax(dim=-1)
    if rows is not None:
        chosen = _column([u[i] for i in rows.index.tolist()], device)
        tokens[rows.index] = invert_cdf(filtered_probabilities(logits[rows.index], rows), chosen)[:, 0]
    if plan.mode is not None:  # the most frequent of `draws` draws, the lowest id among ties
        probs = filtered_probabilities(logits[plan.mode.index], plan.mode)
        for i, row in enumerate(plan.mode.index.tolist()):
            picks = invert_cdf(probs[i : i + 1], _column([u[row]], device))[0]
            tokens[row] = torch.bincount(picks, minlength=logits.shape[-1]).argmax()
    return tokens


def invalid_rows(logits: torch.Tensor, tokens: torch.Tensor) -> list[int]:
    """Rows whose logits are not all finite or whose drawn id is outside the vocabulary: what a
    model's overflow would make, failed alone rather than taking the batch with them."""
    bad = (tokens < 0) | (tokens >= logits.shape[-1]) | ~torch.isfinite(logits).all(dim=-1)
    return bad.nonzero()[:, 0].tolist() if bool(bad.any()) else []

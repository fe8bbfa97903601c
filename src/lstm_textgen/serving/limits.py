"""What one request may ask of a served model, and how a server schedules requests: one definition
for both servers (`mlflow models serve` of the pyfunc in `model.py`, and `lstm-textgen serve`'s
OpenAI-compatible API in `openai_app.py`). Read from the server's environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lstm_textgen.errors import UserError
from lstm_textgen.inference.rows import BatchLimits
from lstm_textgen.params import text_problem

MAX_NEW_TOKENS = 2000
DEFAULT_NEW_TOKENS = 200
# What one request may ask, so that none ties up a server worker for minutes: refused at once, 400.
MAX_ROWS = 64
MAX_PROMPT_CHARACTERS = 10_000
MAX_TOKENS_PER_REQUEST = 32_000  # rows x max_new_tokens
# The work a request costs, in tokens read or drawn: for generation each row's prompt tokens plus its
# new tokens times the uniforms each takes (`draws` for the mode strategy, else 1); for scoring each
# text's tokens. Over it: 400, naming both figures.
MAX_WORK_PER_REQUEST = 2_560_000
MAX_SCORE_TOKENS_PER_REQUEST = 64_000


def prompt_problem(prompt: object, name: str = "prompt") -> str | None:
    """What makes `prompt` unfit for generation or scoring, in a sentence naming it; None if nothing."""
    if not isinstance(prompt, str):
        return f"{name} must be a string, got {type(prompt).__name__} {prompt!r}"
    if not prompt:
        return f"{name} must not be empty"
    if len(prompt) > MAX_PROMPT_CHARACTERS:
        return (
            f"{name} must be at most {MAX_PROMPT_CHARACTERS:,} characters, got {len(prompt):,} "
            "(its last characters carry most of the context: send those)"
        )
    if problem := text_problem(prompt):
        return f"{name} {problem}"
    return None


@dataclass(frozen=True)
class ServingOptions:
    """How a server schedules requests, read from its environment (set the variables before
    `mlflow models serve` or `lstm-textgen serve`)."""

    batching: bool = True  # LSTM_TEXTGEN_BATCHING=off: each request generates alone, in its own thread
    limits: BatchLimits = field(default_factory=BatchLimits)  # LSTM_TEXTGEN_ACTIVE_ROWS, _WAITING_ROWS
    request_seconds: float = 60.0  # MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT: the server gives up then

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> ServingOptions:
        def number(name: str, default: float, kind: type = int) -> Any:
            value = env.get(name, str(default))
            try:
                parsed = kind(value)
            except ValueError:
                parsed = 0
            if not parsed > 0:
                raise UserError(f"{name} must be a positive {kind.__name__}, got {value!r}")
            return parsed

        batching = env.get("LSTM_TEXTGEN_BATCHING", "on").lower()
        if batching not in ("on", "off"):
            raise UserError(f"LSTM_TEXTGEN_BATCHING must be on or off, got {batching!r}")
        limits = BatchLimits(
            active_rows=number("LSTM_TEXTGEN_ACTIVE_ROWS", BatchLimits.active_rows),
            waiting_rows=number("LSTM_TEXTGEN_WAITING_ROWS", BatchLimits.waiting_rows),
        )
        seconds = number("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", cls.request_seconds, float)
        return cls(batching == "on", limits, seconds)

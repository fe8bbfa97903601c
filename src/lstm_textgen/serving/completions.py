"""OpenAI's completions API (`POST /v1/completions`, the "legacy" text API that vLLM and TGI serve
too) in terms of this project's rows: the request checked into `Choice`s (one per prompt and `n`),
stop strings, token log-probabilities, and the response and stream chunks in OpenAI's shapes.

Pure functions and small classes, no server: `openai_app.py` runs them against the batcher. The
limits are the served pyfunc's (`limits.py`), the sampling settings `params.Sampling`'s checks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.errors import UserError
from lstm_textgen.inference.generation import encode_prompt
from lstm_textgen.inference.rows import TokenLogprob
from lstm_textgen.params import ParamsError, SampleParams, Sampling
from lstm_textgen.serving.limits import (
    MAX_NEW_TOKENS,
    MAX_ROWS,
    MAX_TOKENS_PER_REQUEST,
    MAX_WORK_PER_REQUEST,
    prompt_problem,
)

# OpenAI's own default length; its clients and scripts assume it when they send none
DEFAULT_MAX_TOKENS = 16
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARACTERS = 200
MAX_LOGPROBS = 5  # as OpenAI's legacy completions
Request = TypeVar("Request", bound=BaseModel)


class RequestError(UserError):
    """A request the API refuses (HTTP 400), naming the field (`param`) it is about."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class CompletionRequest(BaseModel):
    """The fields OpenAI's completions API documents, with vLLM's `top_k` and this project's `strategy`
    and `draws`. Penalties, `best_of`, `logit_bias` and `suffix` are accepted only at their neutral
    values (clients such as LangChain send them), anything else is refused naming the field."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = None
    top_k: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_ROWS)
    seed: int | None = None
    stop: str | list[str] | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    user: str | None = None
    strategy: Literal["greedy", "sample", "mode"] | None = None
    draws: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    _stops: tuple[str, ...] = PrivateAttr(default=())

    @classmethod
    def parse(cls, body: Any) -> CompletionRequest:
        request = validated(cls, body)
        request.refuse_unsupported()
        request._stops = checked_stops(request.stop)
        return request

    def refuse_unsupported(self) -> None:
        neutral = {
            "presence_penalty": self.presence_penalty == 0,
            "frequency_penalty": self.frequency_penalty == 0,
            "best_of": self.best_of in (None, self.n),
            "logit_bias": not self.logit_bias,
            "suffix": not self.suffix,
        }
        for name, ok in neutral.items():
            if not ok:
                raise RequestError(f"{name} is not supported by this server (leave it unset)", name)
        if self.echo and self.logprobs is not None:
            raise RequestError("echo with logprobs is not supported: ask for one of them", "echo")

    @property
    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise RequestError("prompt must hold at least one text", "prompt")
        for prompt in prompts:
            if problem := prompt_problem(prompt):
                raise RequestError(problem, "prompt")
        return prompts

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop strings as a tuple, checked by `parse`."""
        return self._stops

    def sampling(self, defaults: SampleParams, choice: int) -> Sampling:
        """Choice `choice`'s settings: what the request sets, else the model's registered `sample.*`.
        Temperature 0 is greedy, as in OpenAI's API; choice i is seeded with `seed + i`."""
        strategy = self.strategy or ("greedy" if self.temperature == 0 else None)
        if strategy is None:
            strategy = "sample" if self.temperature is not None else defaults.strategy
        temperature = self.temperature if self.temperature else defaults.temperature
        off_k = self.top_k is not None and self.top_k in (0, -1)  # vLLM's -1, and 0: no top-k
        top_k = None if off_k else (self.top_k if self.top_k is not None else defaults.top_k)
        top_p = self.top_p if self.top_p is not None else defaults.top_p
        seed = None if self.seed is None else (self.seed + choice) % (Sampling.MAX_SEED + 1)
        try:
            return Sampling.checked(
                strategy=strategy,
                temperature=temperature,
                top_k=top_k,
                top_p=None if top_p == 1 else top_p,
                draws=self.draws if self.draws is not None else defaults.draws,
                seed=seed,
            )
        except ParamsError as exc:  # its fields are named as the request's
            raise RequestError(str(exc), exc.field) from None


def checked_stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOPS:
        raise RequestError(f"stop may hold at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    for each in stops:
        if not each or len(each) > MAX_STOP_CHARACTERS:
            raise RequestError(f"each stop string must have 1 to {MAX_STOP_CHARACTERS} characters", "stop")
    return stops


def validated(model: type[Request], body: Any) -> Request:
    """`body` as `model`, or a `RequestError` naming the first field at fault."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> RequestError:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if param is None:
        return RequestError(f"the body must be a JSON object with this API's fields: {first['msg']}")
    if first["type"] == "extra_forbidden":
        return RequestError(f"unknown field {param!r}: see GET /docs for the fields this API takes", param)
    return RequestError(f"{param}: {first['msg']}", param)


@dataclass
class Choice:
    """One text to generate: which prompt, its ids, its settings, and what it has produced."""

    index: int
    copy: int  # which of the prompt's `n` texts
    prompt: str
    prompt_ids: list[int]
    sampling: Sampling
    max_tokens: int
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: dict[str, list[Any]] | None = None


def plan_choices(request: CompletionRequest, vocab: Vocabulary, defaults: SampleParams) -> list[Choice]:
    """Every (prompt, n) pair as a `Choice`, in OpenAI's order (prompt-major), within the limits of
    one request; a prompt the vocabulary cannot encode is refused naming the token."""
    prompts, max_tokens = request.prompts, request.max_tokens or DEFAULT_MAX_TOKENS
    rows = len(prompts) * request.n
    if rows > MAX_ROWS:
        raise RequestError(f"prompts x n may be at most {MAX_ROWS}, got {rows}; send several requests", "n")
    if rows * max_tokens > MAX_TOKENS_PER_REQUEST:
        raise RequestError(
            f"a request may generate at most {MAX_TOKENS_PER_REQUEST:,} tokens in all (prompts x n x "
            f"max_tokens), got {rows * max_tokens:,}",
            "max_tokens",
        )
    choices = []
    for number, prompt in enumerate(prompts):
        try:
            ids = encode_prompt(prompt, vocab, defaults.unknown, defaults.replacement)
        except UserError as exc:
            raise RequestError(str(exc), "prompt") from None
        for copy in range(request.n):
            sampling = request.sampling(defaults, copy)
            choices.append(Choice(number * request.n + copy, copy, prompt, ids, sampling, max_tokens))
    work = sum(len(c.prompt_ids) + c.max_tokens * c.sampling.draws_per_step() for c in choices)
    if work > MAX_WORK_PER_REQUEST:
        raise RequestError(
            f"a request may cost at most {MAX_WORK_PER_REQUEST:,} tokens read or drawn (prompt tokens + "
            f"max_tokens x draws for strategy mode), got {work:,}",
            "max_tokens",
        )
    return choices


class StopScanner:
    """Text as it grows, held back just enough that no stop string is ever half sent: `push` returns
    what is safe to send; once a stop string appears, the text ends before it (`stopped`)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        found = [at for stop in self.stops if (at := self.pending.find(stop)) >= 0]
        if found:
            out, self.pending, self.stopped = self.pending[: min(found)], "", True
            return out
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def finish(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


@dataclass
class LogprobTrack:
    """OpenAI's legacy `logprobs` object for one choice, built as its tokens come."""

    vocab: Vocabulary
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, token: int, logprob: TokenLogprob, offset: int) -> dict[str, list[Any]]:
        """Record one token; the same, alone, as a stream chunk's `logprobs`."""
        text = self.vocab.decode([token])
        top = {self.vocab.decode([i]): value for i, value in logprob[1]}
        self.tokens.append(text)
        self.token_logprobs.append(logprob[0])
        self.top_logprobs.append(top)
        self.text_offset.append(offset)
        return {
            "tokens": [text],
            "token_logprobs": [logprob[0]],
            "top_logprobs": [top],
            "text_offset": [offset],
        }

    def upto(self, length: int) -> dict[str, list[Any]]:
        """The tokens that begin within the first `length` characters (a stop string cut the rest)."""
        keep = sum(1 for offset in self.text_offset if offset < length)
        return {
            "tokens": self.tokens[:keep],
            "token_logprobs": self.token_logprobs[:keep],
            "top_logprobs": self.top_logprobs[:keep],
            "text_offset": self.text_offset[:keep],
        }


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion(ident: str, model: str, choices: list[Choice], created: int | None = None) -> dict[str, Any]:
    """The whole answer (`stream: false`), in OpenAI's shape."""
    completion_tokens = sum(c.tokens for c in choices)
    return {
        "id": ident,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {"index": c.index, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            for c in sorted(choices, key=lambda c: c.index)
        ],
        "usage": usage(prompt_tokens(choices), completion_tokens),
    }


def prompt_tokens(choices: list[Choice]) -> int:
    """The request's prompt tokens, each prompt counted once however many `n` texts it has."""
    return sum(len(c.prompt_ids) for c in choices if c.copy == 0)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chunk(
    ident: str,
    model: str,
    created: int,
    choices: list[dict[str, Any]],
    usage_: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One server-sent event's object (`stream: true`)."""
    body: dict[str, Any] = {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: what its clients turn into their exception types."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

"""How a text is drawn, with one definition for the sample stage, the command line, the served model
and the demo (`Sampling`), each setting bounded; and the sample stage's own keys (`SampleParams`)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lstm_textgen.params.base import ParamsError, Section


class Sampling(Section):
    """How each next token is chosen: the one definition of these settings, their defaults and their
    checks, shared by the sample stage (`sample.*`), the sample command, the served model and the
    demo. Every bound keeps one row's work and arithmetic finite, so no row can stall or break the
    rows that step beside it (docs/bad-inputs.md)."""

    # Below MIN_TEMPERATURE a row is greedy in all but name, and logits / temperature can overflow
    # float32; above MAX_TEMPERATURE every token is equally likely to float32 precision.
    MIN_TEMPERATURE: ClassVar[float] = 1e-3
    MAX_TEMPERATURE: ClassVar[float] = 100.0
    # The mode strategy draws this many tokens per step for a row, on the one batcher thread.
    MAX_DRAWS: ClassVar[int] = 1000
    MAX_SEED: ClassVar[int] = 2**63 - 1

    strategy: Literal["greedy", "sample", "mode"] = Field(
        default="sample",
        description="greedy: argmax; sample: temperature, top_k, top_p; mode: of `draws` draws",
    )
    temperature: float = Field(
        default=0.8, description="divides the logits; below 1: more conservative (0.001 .. 100)"
    )
    top_k: int | None = Field(default=None, description="keep the k most likely tokens (<= vocabulary)")
    top_p: float | None = Field(default=None, description="keep the smallest set holding this mass")
    draws: int = Field(default=80, description="mode strategy: draws per token (1 .. 1000)")
    seed: int | None = Field(default=None, description="null: a different text each time")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if not cls.MIN_TEMPERATURE <= value <= cls.MAX_TEMPERATURE:
            raise ValueError(
                f"must be between {cls.MIN_TEMPERATURE} and {cls.MAX_TEMPERATURE:g}, got {value} "
                "(use strategy greedy for argmax)"
            )
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("draws")
    @classmethod
    def _draws(cls, value: int) -> int:
        if not 1 <= value <= cls.MAX_DRAWS:
            raise ValueError(f"must be between 1 and {cls.MAX_DRAWS}, got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= cls.MAX_SEED:
            raise ValueError(f"must be between 0 and {cls.MAX_SEED} (2**63 - 1), got {value}")
        return value

    @field_validator("top_p")
    @classmethod
    def _probability_mass(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"must be in (0, 1], got {value}")
        return value

    @classmethod
    def checked(cls, **values: Any) -> Sampling:
        """Validate settings from the command line or a request; a bad one raises ParamsError whose
        message reads `<key> must be ...`."""
        try:
            return cls(**values)
        except ValidationError as exc:
            errors = exc.errors()
            first = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
            raise ParamsError("; ".join(_field_problem(err) for err in errors), first) from None

    def check_vocabulary(self, vocab_size: int) -> None:
        """The bound that depends on the model: top_k keeps at most every token there is."""
        if self.top_k is not None and self.top_k > vocab_size:
            raise ParamsError(
                f"top_k must be at most the vocabulary size ({vocab_size:,} tokens), got {self.top_k:,}",
                "top_k",
            )

    def draws_per_step(self) -> int:
        """Uniforms this row takes per generated token: its share of a step's drawing work."""
        return self.draws if self.strategy == "mode" else 1


def text_problem(text: str) -> str | None:
    """Why `text` cannot be encoded (a lone surrogate, e.g. from JSON's "\\ud83d"), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"holds U+{ord(text[exc.start]):04X} at character {exc.start}, half of a surrogate pair "
            "and not a Unicode character; send valid UTF-8"
        )
    return None


def _field_problem(err: Any) -> str:
    key = ".".join(str(part) for part in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    return f"{key} {message}" if message.startswith("must") else f"{key}: {message}, got {err['input']!r}"


class SampleParams(Sampling):
    prompts: list[str] = Field(
        default_factory=lambda: ["ROMEO:\n", "To be, or not to be"],
        min_length=1,
        description="the texts the sample stage continues",
    )
    length: int = Field(default=500, ge=1, le=100_000, description="new tokens per prompt")
    seed: int | None = Field(default=1234, description="null: a different text each time")
    unknown: Literal["error", "skip", "replace"] = Field(
        default="error", description="a prompt token the vocabulary lacks: refuse, drop or replace it"
    )
    replacement: str | None = Field(default=None, description="char level: stands for unknown characters")

    @model_validator(mode="after")
    def _prompts_not_empty(self) -> SampleParams:
        if any(not prompt for prompt in self.prompts):
            raise ValueError("prompts: every prompt needs at least one character")
        for prompt in self.prompts:
            if problem := text_problem(prompt):
                raise ValueError(f"prompts: {prompt[:20]!r}... {problem}")
        return self

    def sampling(self) -> Sampling:
        return Sampling(**{name: getattr(self, name) for name in Sampling.model_fields})

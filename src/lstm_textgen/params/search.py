"""The `tune` section: the search space (`SearchDimension` per key) and the study's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lstm_textgen.params.base import Section


class SearchDimension(Section):
    """One params key the search varies: a float between low and high (`log` for a log scale), an int
    between low and high (by `step`), or one of `choices`."""

    low: int | float | None = Field(default=None, description="the smallest value (floats and ints)")
    high: int | float | None = Field(default=None, description="the largest value, included")
    log: bool = Field(default=False, description="sample on a log scale (low > 0)")
    step: int | float | None = Field(default=None, description="ints: the spacing of the values")
    choices: list[int | float | str | bool] | None = Field(
        default=None, min_length=1, description="a categorical dimension: the values tried"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low and high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range), or choices")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log scale needs low > 0 (low is {self.low})")
        return self

    @property
    def kind(self) -> Literal["categorical", "int", "float"]:
        if self.choices is not None:
            return "categorical"
        ints = all(isinstance(v, int) for v in (self.low, self.high, self.step) if v is not None)
        return "int" if ints else "float"


def _default_space() -> dict[str, SearchDimension]:
    return {
        "train.lr": SearchDimension(low=2e-3, high=2e-2, log=True),
        "model.hidden": SearchDimension(choices=[256, 320, 384, 512]),
        "model.layers": SearchDimension(low=1, high=3),
        "model.dropout": SearchDimension(low=0.0, high=0.3),
        "train.batch_size": SearchDimension(choices=[8, 16, 32]),
        "data.seq_len": SearchDimension(choices=[32, 64, 128]),
    }


class TuneParams(Section):
    """`lstm-textgen tune`: an Optuna study of real training runs on the prepared corpus."""

    @field_validator("storage")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        from urllib.parse import urlsplit

        if value and urlsplit(value).password:
            raise ValueError(
                "must not hold a password (params.yaml is committed, and logged with every run): set "
                "the whole URL in the environment variable LSTM_TEXTGEN_TUNE_STORAGE instead"
            )
        return value

    study: str = Field(default="lstm-textgen", min_length=1, description="the study's name in its storage")
    storage: str | None = Field(
        default=None,
        description="an Optuna storage URL shared by the workers, without its password (that comes "
        "from LSTM_TEXTGEN_TUNE_STORAGE); null: optuna.db beside mlflow.db",
    )
    objective: Literal["val_bits_per_character", "window_val_loss"] = Field(
        default="val_bits_per_character",
        description="minimised: the whole validation split after training (state carried), or the "
        "best periodic estimate",
    )
    space: dict[str, SearchDimension] = Field(
        default_factory=_default_space, min_length=1, description="the params keys searched, by name"
    )
    trials: int | None = Field(default=20, ge=1, description="trials in the study, all workers together")
    minutes: float | None = Field(default=None, gt=0, description="stop starting trials after this")
    trial_minutes: float | None = Field(default=3.0, gt=0, description="each trial's training budget")
    trial_steps: int | None = Field(
        default=None, ge=1, description="each trial's steps (null: train.max_steps)"
    )
    workers: int = Field(default=1, ge=1, le=64, description="worker processes on this machine")
    sampler: Literal["tpe", "random", "grid"] = Field(default="tpe", description="how trials are chosen")
    pruner: Literal["median", "hyperband", "none"] = Field(
        default="median", description="stops a trial whose periodic validation loss lags"
    )
    startup_trials: int = Field(default=5, ge=0, description="trials before TPE and the median pruner act")
    baseline: bool = Field(default=True, description="trial 0 runs params.yaml's own values")
    heartbeat_seconds: int = Field(
        default=60, ge=1, description="a killed worker's trial is marked failed after twice this"
    )
    seed: int = Field(default=0, description="seeds the sampler")
    experiment: bool = Field(
        default=True, description="at the end, run the best params as a DVC experiment (and register it)"
    )

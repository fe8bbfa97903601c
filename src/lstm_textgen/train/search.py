"""The pieces of a hyperparameter search that know Optuna but not MLflow or DVC: the study's sampler
and pruner from the `tune` params, a trial's settings drawn from the space, the params a trial trains
with, and the study itself, opened the same way by every worker (created once: workers starting
together on a new database race on its schema)."""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

from lstm_textgen.params import Params, SearchDimension, TuneParams, flatten, with_settings

if TYPE_CHECKING:
    import optuna

CREATE_ATTEMPTS = 5


def sampler(tune: TuneParams) -> optuna.samplers.BaseSampler:
    import optuna

    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tune.seed)
    if tune.sampler == "grid":
        grid = {key: grid_values(dimension) for key, dimension in tune.space.items()}
        return optuna.samplers.GridSampler(grid, seed=tune.seed)
    return optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=tune.startup_trials)


def grid_values(dimension: SearchDimension) -> list[Any]:
    """The grid sampler's points: the choices, or the ints of a range (floats need choices)."""
    if dimension.choices is not None:
        return list(dimension.choices)
    if dimension.kind == "int":
        return list(range(int(dimension.low), int(dimension.high) + 1, int(dimension.step or 1)))
    return [dimension.low, dimension.high]


def pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    """Optuna does not store the pruner with the study: each worker builds it from the params."""
    import optuna

    if tune.pruner == "none":
        return optuna.pruners.NopPruner()
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=0)


def suggest(trial: optuna.Trial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """The trial's value of each searched key, named as `dvc exp run -S` names it."""
    settings: dict[str, Any] = {}
    for key, dimension in space.items():
        if dimension.kind == "categorical":
            settings[key] = trial.suggest_categorical(key, list(dimension.choices or []))
            continue
        low, high, log, step = dimension.low, dimension.high, dimension.log, dimension.step
        if dimension.kind == "int":
            settings[key] = trial.suggest_int(key, int(low), int(high), step=int(step or 1), log=log)
        else:
            settings[key] = trial.suggest_float(key, float(low), float(high), log=log)
    return settings


def trial_budget(tune: TuneParams) -> dict[str, Any]:
    """A trial's training budget as params keys: what each trial and the best trial's experiment get."""
    budget: dict[str, Any] = {}
    if tune.trial_minutes is not None:
        budget["train.max_minutes"] = tune.trial_minutes
    if tune.trial_steps is not None:
        budget["train.max_steps"] = tune.trial_steps
    return budget


def trial_params(params: Params, settings: dict[str, Any]) -> Params:
    """The params a trial trains with: the searched values, and the trial's budget, from scratch."""
    return with_settings(params, {**settings, **trial_budget(params.tune), "train.resume": False})


def baseline(params: Params) -> dict[str, Any] | None:
    """params.yaml's own values of the searched keys: trial 0, the yardstick of the search; None
    when one of them lies outside the space (Optuna cannot enqueue it)."""
    current = flatten(params.model_dump(include={"data", "model", "train"}))
    values = {key: current[key] for key in params.tune.space}
    outside = [key for key, dimension in params.tune.space.items() if not contains(dimension, values[key])]
    if outside:
        print(f"tune: no baseline trial: params.yaml's {', '.join(outside)} lie outside tune.space")
        return None
    return values


def contains(dimension: SearchDimension, value: Any) -> bool:
    if dimension.choices is not None:
        return value in dimension.choices
    return isinstance(value, (int, float)) and dimension.low <= value <= dimension.high


def open_study(params: Params, storage_url: str) -> optuna.Study:
    """The study, created by whichever worker comes first; the others load it. A worker that loses
    the race on a new database's schema (an integrity or operational error) tries again."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    tune = params.tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in optuna 5: said once per worker
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    storage_url,
                    heartbeat_interval=tune.heartbeat_seconds,
                    grace_period=2 * tune.heartbeat_seconds,
                )
            study = optuna.create_study(
                storage=storage,
                study_name=tune.study,
                direction="minimize",
                sampler=sampler(tune),
                pruner=pruner(tune),
                load_if_exists=True,
            )
            break
        except SQLAlchemyError:
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    # (a grid covers its points itself: it would not count an enqueued one as visited)
    if (
        tune.baseline
        and tune.sampler != "grid"
        and not study.trials
        and not study.user_attrs.get("baseline_enqueued")
    ):
        study.set_user_attr("baseline_enqueued", True)
        values = baseline(params)
        if values is not None:
            study.enqueue_trial(values, skip_if_exists=True)
    return study

"""The served model: an MLflow pyfunc `PythonModel` that wraps the checkpoint and calls the same
generation code as the sample stage and the command line.

Logged in MLflow's models-from-code form (`serving/entry.py`), so loading it never unpickles a Python
object: MLflow imports this package (shipped as code) and `load_context` reads the checkpoint with
`torch.load(weights_only=True)`, on the CPU unless CUDA is there.

Request columns (or inference params of the same names): `prompt` (string, required),
`max_new_tokens` (1..MAX_NEW_TOKENS) and every sampling setting of params.py's `Sampling`:
`strategy` (sample | greedy | mode), `temperature` (> 0), `top_k` (>= 1; 0 = off), `top_p`
(0 < p <= 1; 1 = off), `draws` (mode), `seed` (-1 = unseeded). Their
defaults, `draws` and the policy for tokens outside the vocabulary are the `sample.*` params the
register stage handed to the model. The inference param `task=score` scores each `prompt` instead
(bits per character and per token, perplexity, nats, tokens, unknown; `per_token=true` adds each
token's log-probability), with the same code as `lstm-textgen score`.
Bad values, and requests over the limits below (rows, prompt length, tokens in all), raise an
MlflowException (INVALID_PARAMETER_VALUE) before any generation, which `mlflow models serve` turns
into an HTTP 400 with the message; the server keeps serving.

Every request's rows join one running batcher per loaded model (`inference/batcher.py`), so
concurrent requests share each recurrent step; `ServingOptions` (from the server's environment) sets
how many rows step and wait, and a request that does not fit gets HTTP 503 with `Retry-After`
(`server_adapter.py`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from lstm_textgen.errors import UserError
from lstm_textgen.params import ParamsError, SampleParams, Sampling, scalar_type
from lstm_textgen.serving.limits import (
    DEFAULT_NEW_TOKENS,
    MAX_NEW_TOKENS,
    MAX_ROWS,
    MAX_SCORE_TOKENS_PER_REQUEST,
    MAX_TOKENS_PER_REQUEST,
    MAX_WORK_PER_REQUEST,
    ServingOptions,
    prompt_problem,
)

TASKS = ("generate", "score")
# A request's optional columns: its length, then every sampling setting by its name in params.py.
SAMPLING_COLUMNS = tuple(Sampling.model_fields)
OPTIONAL_COLUMNS = ("max_new_tokens", *SAMPLING_COLUMNS)
# Request values that mean "off" (null in params.yaml), as MLflow's params schema needs a non-null
# default for each: top_k 0, top_p 1, seed -1.
OFF = {"top_k": 0, "top_p": 1.0, "seed": -1}


def column_kind(name: str) -> str:
    """A request column's type in MLflow's schema: long, double or string (from the params' types)."""
    if name == "max_new_tokens":
        return "long"
    return {int: "long", float: "double", str: "string"}[scalar_type(Sampling.model_fields[name].annotation)]


def _setting(name: str, value: Any) -> Any:
    """A request value as `Sampling` takes it: the "off" values become None (any negative seed)."""
    if name == "seed":
        return None if value < 0 else value
    return None if name in OFF and value == OFF[name] else value


def request_defaults(sample: SampleParams) -> dict[str, Any]:
    """A request's defaults: the registered model's sampling settings (its `sample.*` params), unseeded."""
    settings = {name: getattr(sample, name) for name in SAMPLING_COLUMNS} | {"seed": None}
    off = {name: OFF[name] if value is None else value for name, value in settings.items()}
    return {"max_new_tokens": DEFAULT_NEW_TOKENS, **off}


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """numpy scalars from the request frame -> Python numbers, which the strict checks expect."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def _as_int(name: str, value: Any) -> int:
    """An integer, or a float that is one (JSON's 5.0); its range is checked by `Sampling`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, float) or not math.isfinite(value) or not value.is_integer():
        raise _bad_request(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad_request(f"{name} must be a finite number, got {value!r}")
    return float(value)


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The request's rows as dicts: through one object array, several times cheaper than
    `to_dict("records")` on pandas' Arrow-backed string columns (it runs for every request)."""
    columns = list(frame.columns)
    return [dict(zip(columns, values, strict=True)) for values in frame.to_numpy(dtype=object).tolist()]


def checked_prompt(row: dict[str, Any]) -> str:
    prompt = row.get("prompt")
    if problem := prompt_problem(prompt):
        raise _bad_request(problem)
    return prompt


def request_frame(model_input: Any) -> pd.DataFrame:
    """Every input form MLflow documents for a column signature as one frame of rows: a DataFrame,
    a dict of lists (one key or several), a dict of scalars (one row), a list of dicts. MLflow hands
    a dict whose only key holds a list through as a one-row frame of that list: unpacked here."""
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, Mapping):
        scalars = all(np.ndim(value) == 0 for value in model_input.values())
        frame = pd.DataFrame([dict(model_input)] if scalars else dict(model_input))
    elif isinstance(model_input, list) and all(isinstance(item, Mapping) for item in model_input):
        frame = pd.DataFrame(list(model_input))
    else:
        raise _bad_request(
            f"the request must be rows with a 'prompt' column, got {type(model_input).__name__}"
        )
    if len(frame) == 1 and "prompt" in frame.columns and np.ndim(frame["prompt"].iloc[0]) == 1:
        packed = {name: frame[name].iloc[0] for name in frame.columns}
        frame = pd.DataFrame({k: list(v) if np.ndim(v) == 1 else v for k, v in packed.items()})
    return frame


def request_task(params: dict[str, Any] | None) -> tuple[str, bool]:
    """The inference params `task` (generate | score) and `per_token` (score: list each token)."""
    task = (params or {}).get("task", "generate")
    if task not in TASKS:
        raise _bad_request(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    per_token = (params or {}).get("per_token", False)
    if not isinstance(per_token, bool):
        raise _bad_request(f"per_token must be true or false, got {per_token!r}")
    return task, per_token


def request_settings(
    row: dict[str, Any], params: dict[str, Any], sample: SampleParams
) -> tuple[str, int, Sampling]:
    """One row's prompt, length and sampling: its own columns, else the inference params, else the
    model's defaults. Types are checked here; the ranges by `Sampling`, as everywhere else."""
    defaults = request_defaults(sample)
    merged = dict(defaults)
    merged.update({k: _plain(v) for k, v in (params or {}).items() if k in defaults and not _is_missing(v)})
    merged.update({k: _plain(row[k]) for k in OPTIONAL_COLUMNS if k in row and not _is_missing(row[k])})
    prompt = checked_prompt(row)
    max_new = _as_int("max_new_tokens", merged["max_new_tokens"])
    if not 1 <= max_new <= MAX_NEW_TOKENS:
        raise _bad_request(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new}")
    parse = {"long": _as_int, "double": _as_float, "string": lambda name, value: value}
    values = {name: parse[column_kind(name)](name, merged[name]) for name in SAMPLING_COLUMNS}
    try:
        sampling = Sampling.checked(**{name: _setting(name, value) for name, value in values.items()})
    except UserError as exc:
        raise _bad_request(str(exc)) from None
    return prompt, max_new, sampling


class TextGenerator(mlflow.pyfunc.PythonModel):
    """prompt -> generated text, with the checkpoint's vocabulary and unknown-token policy. Every
    request's rows join one batcher per loaded model (`inference/batcher.py`), so concurrent requests
    share each recurrent step."""

    def load_context(self, context: Any) -> None:
        import torch

        from lstm_textgen.inference.batcher import RowBatcher
        from lstm_textgen.model.checkpoint import load_model
        from lstm_textgen.serving.drain import install_drain
        from lstm_textgen.serving.server_adapter import adapt_scoring_server

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.loaded = load_model(Path(context.artifacts["checkpoint"]), device)
        self.options = ServingOptions.from_environment()
        self.batcher: RowBatcher | None = (
            None  # off: MLflow's server as it is, each request alone (for comparison)
        )
        if self.options.batching:
            self.batcher = RowBatcher(self.loaded.model, self.options.limits).start()
            if "mlflow.pyfunc.scoring_server.app" in sys.modules:  # loaded by `mlflow models serve`
                places = self.options.limits.active_rows + self.options.limits.waiting_rows
                adapt_scoring_server(
                    places,
                    healthy=lambda: self.batcher.healthy,
                    at_startup=lambda: install_drain(self.batcher, "mlflow models serve"),
                )

    def close(self) -> None:
        """Stop the batcher's thread now, not at interpreter exit (where it is stopped anyway): for a
        script or notebook done with the model, `model.unwrap_python_model().close()`, or `with`."""
        if getattr(self, "batcher", None) is not None:
            self.batcher.stop()

    def __enter__(self) -> TextGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # pd.DataFrame: MLflow infers no request schema from it (and warns on no hint or on `Any`)
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        frame = request_frame(model_input)
        if "prompt" not in frame.columns:
            raise _bad_request("the request needs a 'prompt' column")
        if len(frame) > MAX_ROWS:
            raise _bad_request(f"a request may hold at most {MAX_ROWS} rows, got {len(frame)}; send several")
        task, per_token = request_task(params)
        if task == "score":
            return self.score(frame, per_token)
        sample = self.loaded.params.sample
        rows = [request_settings(row, params or {}, sample) for row in records(frame)]
        total = sum(length for _, length, _ in rows)
        if total > MAX_TOKENS_PER_REQUEST:
            raise _bad_request(
                f"a request may generate at most {MAX_TOKENS_PER_REQUEST:,} tokens in all (rows x "
                f"max_new_tokens), got {total:,}; lower max_new_tokens or send fewer rows"
            )
        return pd.DataFrame({"text": np.array(self.generate(rows), dtype=object)})  # no string-array build

    def generate(self, rows: list[tuple[str, int, Sampling]]) -> list[str]:
        """Each row's text, its rows stepping beside every other request's (or alone, batching off)."""
        from lstm_textgen.inference.batcher import RowBatcher
        from lstm_textgen.inference.generation import continuation, encode_prompt
        from lstm_textgen.inference.rows import Overloaded, Row
        from lstm_textgen.serving.server_adapter import client_gone, overloaded

        sample, vocab = self.loaded.params.sample, self.loaded.vocab
        try:
            ids = [encode_prompt(prompt, vocab, sample.unknown, sample.replacement) for prompt, _, _ in rows]
        except UserError as exc:
            raise _bad_request(str(exc)) from None
        work = sum(
            len(i) + length * sampling.draws_per_step()
            for i, (_, length, sampling) in zip(ids, rows, strict=True)
        )
        if work > MAX_WORK_PER_REQUEST:
            raise _bad_request(
                f"a request may cost at most {MAX_WORK_PER_REQUEST:,} tokens read or drawn (prompt "
                f"tokens + max_new_tokens x draws for strategy mode, summed over rows), got {work:,}; "
                "lower draws, max_new_tokens or the rows"
            )
        deadline = time.monotonic() + self.options.request_seconds
        handles = [
            Row(prompt_ids, length, sampling, deadline=deadline, abandoned=client_gone())
            for prompt_ids, (_, length, sampling) in zip(ids, rows, strict=True)
        ]
        try:
            if self.batcher is None:  # one loop per request, in the request's thread (for comparison)
                generated = RowBatcher(self.loaded.model).run(handles)
                return [continuation(vocab, i, tokens) for i, tokens in zip(ids, generated, strict=True)]
            self.batcher.submit(handles)
        except Overloaded as exc:
            raise overloaded(str(exc)) from None
        except ParamsError as exc:  # `submit` checks what depends on the model (top_k, its vocabulary)
            raise _bad_request(str(exc)) from None
        try:
            return [continuation(vocab, i, handle.result()) for i, handle in zip(ids, handles, strict=True)]
        except Overloaded as exc:  # cut short by a server that stops: 503, send it again
            raise overloaded(str(exc)) from None
        except UserError as exc:
            raise _bad_request(str(exc)) from None
        finally:
            for handle in handles:
                handle.cancel()  # a row of a request that failed leaves at the next step

    def score(self, frame: pd.DataFrame, per_token: bool) -> pd.DataFrame:
        """task=score: each row's `prompt` scored (scoring.py), one row of figures per prompt; the
        short texts of a request in one pass, on the batcher's thread between its steps (admitted,
        refused when full, dropped past the deadline or when the client went away)."""
        from lstm_textgen.inference.rows import Job, Overloaded
        from lstm_textgen.inference.scoring import score_row, score_texts
        from lstm_textgen.serving.server_adapter import client_gone, overloaded

        prompts = [checked_prompt(row) for row in records(frame)]
        loaded, sample = self.loaded, self.loaded.params.sample
        tokens = sum(len(loaded.vocab.tokenize(loaded.vocab.normalise(p))) for p in prompts)
        if tokens > MAX_SCORE_TOKENS_PER_REQUEST:
            raise _bad_request(
                f"a request may score at most {MAX_SCORE_TOKENS_PER_REQUEST:,} tokens in all, got "
                f"{tokens:,}; send fewer or shorter texts"
            )

        def work() -> list[Any]:
            return score_texts(
                loaded.model,
                loaded.vocab,
                prompts,
                windows=loaded.params.evaluate,
                unknown=sample.unknown,
                replacement=sample.replacement,
                per_token=per_token,
            )

        try:
            if self.batcher is None:
                scores = work()
            else:
                deadline = time.monotonic() + self.options.request_seconds
                job = Job(work, rows=len(prompts), deadline=deadline, abandoned=client_gone())
                try:
                    self.batcher.submit_job(job)
                except Overloaded as exc:
                    raise overloaded(str(exc)) from None
                scores = job.result()
        except UserError as exc:
            raise _bad_request(str(exc)) from None
        return pd.DataFrame([score_row(scored) for scored in scores])

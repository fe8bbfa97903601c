"""The served model: an MLflow pyfunc `PythonModel` that wraps the checkpoint and calls the same
generation code as the sample stage and the command line.

Logged in MLflow's models-from-code form (`pyfunc_entry.py`), so loading it never unpickles a Python
object: MLflow imports this package (shipped as code) and `load_context` reads the checkpoint with
`torch.load(weights_only=True)`, on the CPU unless CUDA is there.

Request columns (or inference params of the same names): `prompt` (string, required),
`max_new_tokens` (1..MAX_NEW_TOKENS), `temperature` (> 0), `top_k` (>= 1; 0 = off),
`top_p` (0 < p <= 1), `seed` (-1 = unseeded), `strategy` (sample | greedy | mode).
Bad values raise an MlflowException (INVALID_PARAMETER_VALUE), which `mlflow models serve` turns
into an HTTP 400 with the message; the server keeps serving.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

MAX_NEW_TOKENS = 2000
DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 200,
    "temperature": 0.8,
    "top_k": 0,
    "top_p": 1.0,
    "seed": -1,
    "strategy": "sample",
}
OPTIONAL_COLUMNS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "strategy")


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise _bad_request(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_request(f"{name} must be a number, got {value!r}")
    return float(value)


def request_settings(row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """One row's settings: its own columns, else the inference params, else the defaults; validated."""
    merged = dict(DEFAULTS)
    merged.update({k: v for k, v in (params or {}).items() if k in DEFAULTS and not _is_missing(v)})
    merged.update({k: row[k] for k in OPTIONAL_COLUMNS if k in row and not _is_missing(row[k])})
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise _bad_request(f"prompt must be a string, got {type(prompt).__name__} {prompt!r}")
    if not prompt:
        raise _bad_request("prompt must not be empty")
    max_new = _as_int("max_new_tokens", merged["max_new_tokens"])
    if not 1 <= max_new <= MAX_NEW_TOKENS:
        raise _bad_request(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new}")
    temperature = _as_float("temperature", merged["temperature"])
    if not temperature > 0:
        raise _bad_request(f"temperature must be > 0, got {temperature} (use strategy 'greedy' for argmax)")
    top_k = _as_int("top_k", merged["top_k"])
    if top_k < 0:
        raise _bad_request(f"top_k must be >= 1, or 0 for off; got {top_k}")
    top_p = _as_float("top_p", merged["top_p"])
    if not 0 < top_p <= 1:
        raise _bad_request(f"top_p must be in (0, 1], got {top_p}")
    strategy = merged["strategy"]
    if strategy not in ("sample", "greedy", "mode"):
        raise _bad_request(f"strategy must be one of sample, greedy, mode; got {strategy!r}")
    seed = _as_int("seed", merged["seed"])
    return {
        "prompt": prompt,
        "max_new_tokens": max_new,
        "temperature": temperature,
        "top_k": top_k or None,
        "top_p": None if top_p == 1 else top_p,
        "seed": None if seed < 0 else seed,
        "strategy": strategy,
    }


class TextGenerator(mlflow.pyfunc.PythonModel):
    """prompt -> generated text, with the checkpoint's vocabulary and unknown-token policy."""

    def load_context(self, context: Any) -> None:
        import torch

        from lstm_textgen.checkpoint import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.loaded = load_model(Path(context.artifacts["checkpoint"]), device)

    # pd.DataFrame: MLflow infers no request schema from it (and warns on no hint or on `Any`)
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from lstm_textgen.errors import UserError
        from lstm_textgen.generation import Sampling, sample_texts

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in frame.columns:
            raise _bad_request("the request needs a 'prompt' column")
        rows = [request_settings(row, params or {}) for row in frame.to_dict(orient="records")]
        sample = self.loaded.params.sample
        groups: dict[tuple[Any, ...], list[int]] = {}  # rows with the same settings generate as one batch
        for i, row in enumerate(rows):
            groups.setdefault(tuple(v for k, v in row.items() if k != "prompt"), []).append(i)
        texts: list[str] = [""] * len(rows)
        for indices in groups.values():
            first = rows[indices[0]]
            sampling = Sampling(
                first["strategy"],
                first["temperature"],
                first["top_k"],
                first["top_p"],
                sample.draws,
                first["seed"],
            )
            try:
                generated = sample_texts(
                    self.loaded.model,
                    self.loaded.vocab,
                    [rows[i]["prompt"] for i in indices],
                    first["max_new_tokens"],
                    sampling,
                    sample.unknown,
                    sample.replacement,
                )
            except UserError as exc:
                raise _bad_request(str(exc)) from None
            for i, text in zip(indices, generated, strict=True):
                texts[i] = text
        return pd.DataFrame({"text": texts})

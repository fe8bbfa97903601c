"""The fine-tuning source that the `init` stage resolved into data/init/ (`source.json`: what it is,
exactly; `source.pt`: its weights, vocabulary and params). Prepare keeps its vocabulary first in the new
one; train starts from its weights. Both read these files, so DVC re-runs them exactly when it changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lstm_textgen.errors import UserError
from lstm_textgen.files import read_json
from lstm_textgen.params import SHAPE, DataParams, ModelParams, Params, marked_keys

# the model keys that decide the weights' shapes: a fine-tuned model keeps the source's values
SHAPE_KEYS = sorted(marked_keys(ModelParams, SHAPE))


def check_compatible(source: dict[str, Any], data: DataParams, model: ModelParams | None) -> None:
    """The model's shape comes from the source: a differing model.* key (or level) is an error.
    Prepare checks the data keys only (it does not read model.*: a model change must not re-run it)."""
    saved_model, saved_data = source["params"]["model"], source["params"]["data"]
    differing = [
        f"model.{key}: {saved_model.get(key)} in the source, {getattr(model, key)} in params.yaml"
        for key in SHAPE_KEYS
        if model is not None and key in saved_model and saved_model[key] != getattr(model, key)
    ]
    for key in ("level", "lowercase"):
        if saved_data.get(key, getattr(data, key)) != getattr(data, key):
            differing.append(
                f"data.{key}: {saved_data[key]} in the source, {getattr(data, key)} in params.yaml"
            )
    if differing:
        raise UserError(
            "train.init_from: the source model does not match params.yaml; set these to the source's "
            "values: " + "; ".join(differing)
        )


def load_resolved(init_dir: Path, params: Params, check_model: bool = True) -> dict[str, Any] | None:
    """The source the init stage resolved for `train.init_from` (None when it is null), checked
    against the params (the data keys, and the model's unless `check_model` is false)."""
    spec = params.train.init_from
    if spec is None:
        return None
    path, summary = init_dir / "source.pt", init_dir / "source.json"
    if not path.is_file() or not summary.is_file() or read_json(summary).get("init_from") != spec:
        raise UserError(f"{init_dir}: not resolved for train.init_from {spec}; run `dvc repro init`")
    import torch

    source = torch.load(path, map_location="cpu", weights_only=True)
    check_compatible(source, params.data, params.model if check_model else None)
    return source

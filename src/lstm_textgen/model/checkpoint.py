"""The one checkpoint format: a dict of tensors and plain values, read by every consumer through
`load_checkpoint` with `torch.load(weights_only=True)` (no pickled code), on any device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.errors import UserError
from lstm_textgen.files import atomic_path
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.params import Params, SampleParams, parse_params

# The layout this code writes. 2: the training state as `TrainState.state_dict` writes it, with no
# older variant read back. The model's part (model, vocab, params) is the same in 1 and 2, so a model
# of either loads; resuming needs 2 (train/checkpointer.py).
FORMAT_VERSION = 2
MODEL_FORMATS = (1, 2)


@dataclass(frozen=True)
class LoadedModel:
    model: RecurrentLM
    vocab: Vocabulary
    params: Params
    checkpoint: dict[str, Any]


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically: a crash mid-save leaves the previous checkpoint intact."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"format_version": FORMAT_VERSION, **checkpoint}, tmp)


class CheckpointError(UserError):
    """A checkpoint is missing, damaged or of another format; the message names the file."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint not found (run `dvc repro train` first)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, foreign bytes, a pickle with code in it
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} cannot be read: it is truncated or corrupted ({reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format_version") not in MODEL_FORMATS:
        found = (
            checkpoint.get("format_version") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        )
        known = " or ".join(map(str, MODEL_FORMATS))
        raise CheckpointError(
            f"{path}: checkpoint format {found} is not {known} (not an lstm-textgen checkpoint?)"
        )
    return checkpoint


def serving_checkpoint(checkpoint: dict[str, Any], sample: SampleParams) -> dict[str, Any]:
    """What a served model needs and nothing more: the weights, the vocabulary and the data, model,
    evaluate and `sample` params (today's, not those stored at training time). No optimizer, no history."""
    params = checkpoint["params"]
    corpus = params["data"]["corpus"]
    kept = {
        "data": params["data"],
        "corpora": {name: spec for name, spec in params.get("corpora", {}).items() if name == corpus},
        "model": params["model"],
        "evaluate": params.get("evaluate", {}),  # the windowing scores are computed with
        "sample": sample.model_dump(),
    }
    return {"model": checkpoint["model"], "vocab": checkpoint["vocab"], "params": kept}


def load_model(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Checkpoint -> model in eval mode on `device`, with its vocabulary and params (a serving
    checkpoint holds the data, model and sample sections; the others are then defaults)."""
    checkpoint = load_checkpoint(path)
    params = parse_params(checkpoint["params"], source=f"{path} params")
    vocab = Vocabulary.from_dict(checkpoint["vocab"])
    model = RecurrentLM(len(vocab), params.model)
    model.load_state_dict(checkpoint["model"])
    return LoadedModel(model.to(device).eval(), vocab, params, checkpoint)

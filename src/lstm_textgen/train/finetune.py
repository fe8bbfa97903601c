"""Starting from a trained model (`train.init_from`): its weights grown to the new tokens of the
prepared vocabulary (the source's tokens come first in it), and the lineage shown in the MLflow UI.
Where the source comes from: `tracking/sources.py`; the resolved files: `data/source.py`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lstm_textgen.data.source import load_resolved
from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.errors import UserError
from lstm_textgen.files import read_json
from lstm_textgen.params import ModelParams, Params

if TYPE_CHECKING:
    from pathlib import Path

    import torch


def grown_weights(state: dict[str, torch.Tensor], old: int, new: int, model: ModelParams) -> dict[str, Any]:
    """The source's weights for a vocabulary of `new` tokens (its `old` first): each new token's
    embedding, one-hot input column and output row start as the mean of the existing ones, so a new
    character begins as an average one rather than as noise."""
    if new == old:
        return state
    import torch

    grown = dict(state)

    def rows(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        mean = tensor.mean(dim=dim, keepdim=True)
        extra = mean.expand(*[new - old if d == dim else s for d, s in enumerate(tensor.shape)])
        return torch.cat([tensor, extra], dim=dim)

    for key in ("embedding.weight", "head.weight", "head.bias"):
        if key in grown:
            grown[key] = rows(grown[key])
    if model.input == "onehot":
        grown["rnn.weight_ih_l0"] = rows(grown["rnn.weight_ih_l0"], dim=1)
    return grown


def initial_weights(init_dir: Path, params: Params, vocab: Vocabulary) -> dict[str, torch.Tensor] | None:
    """The weights training starts from: the source's, grown to the prepared vocabulary (None: none)."""
    source = load_resolved(init_dir, params)
    if source is None:
        return None
    old = tuple(source["vocab"]["tokens"])
    if vocab.tokens[: len(old)] != old:
        raise UserError(
            "data/prepared was not prepared for this train.init_from (its first tokens are not the "
            "source model's); run `dvc repro prepare`"
        )
    return grown_weights(source["model"], len(old), len(vocab), params.model)


def source_lineage(init_dir: Path, vocab_size: int) -> dict[str, str]:
    """The resolved source's lineage (source.json), plus how many tokens the source model never saw."""
    lineage = read_json(init_dir / "source.json")
    return {**lineage, "init_added_tokens": str(vocab_size - int(lineage["init_from_vocab_size"]))}

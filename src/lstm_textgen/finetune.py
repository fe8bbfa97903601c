"""Starting from a trained model (`train.init_from`): where it comes from, its vocabulary kept first
in the new one, its weights grown to the new tokens, and the lineage recorded.

The `init` stage resolves the source once (a checkpoint path, `models:/NAME@alias`,
`models:/NAME/VERSION` or `runs:/ID/model`) into data/init/: `source.json` (what it is, exactly:
the file's sha256 or the registered version and run) and `source.pt` (its weights, vocabulary and
params). Prepare and train read those files, so DVC re-runs them exactly when the source changes.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lstm_textgen.errors import UserError
from lstm_textgen.files import read_json
from lstm_textgen.params import DataParams, ModelParams, Params
from lstm_textgen.vocab import Vocabulary

if TYPE_CHECKING:  # torch is imported where weights are handled: prepare reads no weights
    import torch

SHAPE_KEYS = ("cell", "input", "embedding_dim", "layers", "hidden", "tie_weights")


def resolve_source(spec: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The source's checkpoint (model, vocab, params) and its lineage (what to tag the run with)."""
    if spec.startswith(("models:/", "runs:/")):
        return _registered_source(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"train.init_from: {spec}: no such checkpoint file (or use models:/NAME@champion)")
    from lstm_textgen.checkpoint import load_checkpoint

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return load_checkpoint(path), {"init_from": spec, "init_from_sha256": digest}


def _registered_source(spec: str) -> tuple[dict[str, Any], dict[str, str]]:
    from lstm_textgen import tracking
    from lstm_textgen.registry import load_registered

    mlflow = tracking.configure()
    lineage = {"init_from": spec}
    uri = spec
    if spec.startswith("models:/"):
        name, _, ref = spec.removeprefix("models:/").partition("@")
        client = mlflow.MlflowClient()
        try:
            if ref:
                version = client.get_model_version_by_alias(name, ref)
            else:
                name, _, number = name.partition("/")
                version = client.get_model_version(name, number)
        except Exception as exc:  # MlflowException: not found, bad alias
            raise UserError(f"train.init_from: {spec}: {str(exc).splitlines()[0]}") from None
        uri = f"models:/{version.name}/{version.version}"  # the alias resolved once, here
        lineage |= {"init_from_model": version.name, "init_from_version": str(version.version)}
        lineage["init_from_run_id"] = version.run_id or ""
    else:
        lineage["init_from_run_id"] = spec.removeprefix("runs:/").split("/")[0]
    try:
        loaded = load_registered(uri)
    except Exception as exc:  # a missing run or artifact
        raise UserError(f"train.init_from: {spec}: cannot load it: {str(exc).splitlines()[0]}") from None
    return loaded.checkpoint, lineage


def checkpoint_digest(checkpoint: dict[str, Any]) -> str:
    import torch

    buffer = io.BytesIO()
    torch.save({k: checkpoint[k] for k in ("model", "vocab")}, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


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


def lineage_note(lineage: dict[str, str]) -> str:
    """A line for the run's description in the MLflow UI, with a link to the source."""
    if "init_from_model" in lineage:
        name, version = lineage["init_from_model"], lineage["init_from_version"]
        return f"Fine-tuned from [{name} version {version}](#/models/{name}/versions/{version})."
    if lineage.get("init_from_run_id"):
        return f"Fine-tuned from the model of run `{lineage['init_from_run_id']}`."
    digest = lineage["init_from_sha256"][:12]
    return f"Fine-tuned from the checkpoint `{lineage['init_from']}` (sha256 {digest})."

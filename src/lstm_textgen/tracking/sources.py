"""Where a fine-tuning source (`train.init_from`) comes from: a checkpoint file, or a registered model
(`models:/NAME@alias`, `models:/NAME/VERSION`, `runs:/ID/model`) resolved once to one version, with the
lineage that the training run is tagged with. The `init` stage writes the result into data/init/."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from lstm_textgen.errors import UserError


def resolve_source(spec: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The source's checkpoint (model, vocab, params) and its lineage (what to tag the run with)."""
    if spec.startswith(("models:/", "runs:/")):
        return _registered_source(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"train.init_from: {spec}: no such checkpoint file (or use models:/NAME@champion)")
    from lstm_textgen.model.checkpoint import load_checkpoint

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return load_checkpoint(path), {"init_from": spec, "init_from_sha256": digest}


def _registered_source(spec: str) -> tuple[dict[str, Any], dict[str, str]]:
    from lstm_textgen.tracking import store
    from lstm_textgen.tracking.registry import load_registered

    mlflow = store.configure()
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

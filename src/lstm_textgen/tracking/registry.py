"""Model registration: log the checkpoint as an MLflow pyfunc model (models-from-code, explicit
signature, pinned requirements), register a new version, and move the `champion` alias only when the
new version's validation loss beats the current champion's on the same corpus and tokenisation."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lstm_textgen.model.checkpoint import load_checkpoint, save_checkpoint, serving_checkpoint
from lstm_textgen.params import SampleParams
from lstm_textgen.serving.model import OPTIONAL_COLUMNS, column_kind, request_defaults
from lstm_textgen.tracking import liveness, store
from lstm_textgen.tracking.outbox import send_waiting

CHAMPION = "champion"
# The logged model ships the whole package (its code is the model: no pickle) and is built by this file.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
SERVED_ENTRY = PACKAGE_DIR / "serving" / "entry.py"


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: int
    model_uri: str
    champion_version: int
    promoted: bool
    reason: str


def default_model_name(corpus: str, level: str) -> str:
    return f"lstm-textgen-{corpus}-{level}"


def signature(sample: SampleParams) -> Any:
    """The request schema; the params' defaults are the served model's (from `sample`).

    The numeric optional columns are typed `Any`: a request whose rows set a column in some rows
    only arrives as a column with gaps (NaN), which MLflow cannot put in a `long` column, and a
    `double` column refuses whole numbers. The served model checks each value itself, naming the
    column, and a row's gap takes the default."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    kind = lambda name: column_kind(name) if column_kind(name) == "string" else AnyType()  # noqa: E731
    columns = [ColSpec(kind(name), name, required=False) for name in OPTIONAL_COLUMNS]
    inputs = Schema([ColSpec("string", "prompt"), *columns])
    defaults = request_defaults(sample)
    specs = [ParamSpec(name, column_kind(name), defaults[name]) for name in OPTIONAL_COLUMNS]
    specs += [ParamSpec("task", "string", "generate"), ParamSpec("per_token", "boolean", False)]
    scored = [ColSpec("double", name, required=False) for name in SCORE_COLUMNS]
    outputs = Schema([ColSpec("string", "text", required=False), *scored])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema(specs))


# task=score's answer, one row per prompt (scoring.TextScore.figures)
SCORE_COLUMNS = (
    "bits_per_character",
    "bits_per_token",
    "perplexity",
    "nats",
    "tokens",
    "predicted",
    "characters",
    "unknown",
)


def pip_requirements() -> list[str]:
    """Pinned explicitly: inference would pin a local `+cpu` torch or pull in unneeded packages."""
    from importlib.metadata import version

    return [
        f"torch=={version('torch').split('+')[0]}",
        f"mlflow=={version('mlflow')}",
        f"numpy=={version('numpy')}",
        f"pandas=={version('pandas')}",
        f"pydantic=={version('pydantic')}",
        f"pyyaml=={version('pyyaml')}",
        f"tokenizers=={version('tokenizers')}",  # BPE models encode prompts with it
    ]


def register(
    checkpoint: Path,
    run_id: str,
    model_name: str,
    *,
    example_prompt: str,
    val_loss: float,
    version_tags: dict[str, str],
    sample: SampleParams | None = None,
) -> Registration:
    """Log + register; promote to champion only on improvement. `version_tags` must hold
    `corpus` and `level` (what makes two versions comparable). The logged model carries the
    weights, vocabulary and params it serves with: `sample` (the current `sample.*` params; default:
    those stored at training time) sets its defaults and its policy for unknown tokens."""
    import mlflow
    from mlflow.tracking import MlflowClient

    trained = load_checkpoint(checkpoint)
    sample = sample or SampleParams.model_validate(trained["params"]["sample"])
    served = serving_checkpoint(trained, sample)
    with tempfile.TemporaryDirectory() as tmp, liveness.active_run(run_id=run_id):
        # the active run configures the store, which MlflowClient() then uses
        send_waiting(MlflowClient())  # the run's points kept during an outage, before its model
        save_checkpoint(Path(tmp) / "model.pt", served)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVED_ENTRY),
            artifacts={"checkpoint": str(Path(tmp) / "model.pt")},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(sample),
            input_example=pd.DataFrame({"prompt": [example_prompt], "max_new_tokens": [8]}),
            pip_requirements=pip_requirements(),
            registered_model_name=model_name,
        )
    client = MlflowClient()
    version = int(info.registered_model_version)
    for key, value in {**version_tags, "val_loss": f"{val_loss:.6f}", "run_id": run_id}.items():
        client.set_model_version_tag(model_name, str(version), key, value)

    with store.registry_lock():  # on one machine: read the champion and move it as one step
        promoted, reason, champion_version = _decide(client, model_name, version, val_loss, version_tags)
        if promoted:
            set_champion(client, model_name, version)
        champion_version = settle_champion(client, model_name)
    if promoted and champion_version != version:
        reason += f"; v{champion_version}, registered meanwhile, is better still: it is the champion"
    promoted = champion_version == version
    return Registration(
        model_name, version, f"models:/{model_name}/{version}", champion_version, promoted, reason
    )


COMPARABLE = ("corpus", "level", "lowercase")


def settle_champion(client: Any, name: str, rounds: int = 10) -> int:
    """Move `champion` to the best version comparable with it (same corpus and tokenisation, lowest
    validation loss, the older on a tie) until a fresh read finds it there. Registrations on several
    machines (one tracking server, no shared lock) may read and write the alias in any order: each
    one settles after its own write, so whichever writes last sees every version registered before
    it, and the alias ends on the best whatever the order. Returns the champion's version."""
    from mlflow.exceptions import MlflowException

    for _ in range(rounds):
        try:
            current = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            return 0
        anchor = {key: current.tags.get(key) for key in COMPARABLE}
        versions = client.search_model_versions(f"name='{name}'")
        comparable = [
            v
            for v in versions
            if all(v.tags.get(key) == value for key, value in anchor.items())
            and liveness.tag_number(v.tags, "val_loss") is not None  # a tag anyone with EDIT may have garbled
        ]
        best = min(
            comparable,
            key=lambda v: (liveness.tag_number(v.tags, "val_loss"), int(v.version)),
            default=current,
        )
        if int(best.version) == int(current.version):
            return int(current.version)
        set_champion(client, name, int(best.version))
    return int(client.get_model_version_by_alias(name, CHAMPION).version)


def set_champion(client: Any, name: str, version: int, attempts: int = 5) -> None:
    """Point `champion` at `version`. Two machines setting a new model's first alias at the same
    moment meet in the database (MLflow inserts it: one gets a unique-key violation); the one
    refused tries again, as an update, and `settle_champion` then decides between them."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, CHAMPION, str(version))
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _decide(
    client: Any, name: str, version: int, val_loss: float, tags: dict[str, str]
) -> tuple[bool, str, int]:
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return True, "first version with a validation loss: it becomes the champion", version
    old_loss = liveness.tag_number(current.tags, "val_loss")
    old_loss = math.inf if old_loss is None else old_loss
    comparable = all(current.tags.get(k) == tags.get(k) for k in ("corpus", "level", "lowercase"))
    if not comparable:
        return (
            False,
            f"champion v{current.version} was trained on another corpus or tokenisation "
            f"({current.tags.get('corpus')}, {current.tags.get('level')}); it stays",
            int(current.version),
        )
    versus = f"validation loss {val_loss:.4f} vs champion v{current.version}'s {old_loss:.4f}"
    if round(val_loss, 6) < old_loss:  # the champion's loss is stored as a tag with 6 decimals
        return True, f"{versus}: better, it becomes the champion", version
    return False, f"{versus}: does not beat it, the champion stays", int(current.version)


def registration_summary(registration: Registration) -> dict[str, Any]:
    return asdict(registration)


def load_registered(uri: str, device: str | Any = "cpu") -> Any:
    """A logged or registered model (`models:/NAME@champion`, `models:/NAME/3`, `runs:/ID/model`) as
    the `LoadedModel` it serves, on `device`."""
    from lstm_textgen.tracking import store

    mlflow = store.configure()
    loaded = mlflow.pyfunc.load_model(uri).unwrap_python_model().loaded
    loaded.model.to(device)
    return loaded


def load_source(source: str, device: str | Any = "cpu") -> Any:
    """A checkpoint path or a model URI (`models:/...`, `runs:/...`) as a `LoadedModel` on `device`."""
    from lstm_textgen.model.checkpoint import load_model

    if ":/" in source and not Path(source).exists():
        return load_registered(source, device)
    if not Path(source).is_file():
        from lstm_textgen.errors import UserError

        raise UserError(
            f"{source}: no such checkpoint; give a .pt path or a model URI (models:/NAME@champion)"
        )
    return load_model(Path(source), device)

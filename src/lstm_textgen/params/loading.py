"""Reading params.yaml into `Params`, with one message naming every bad key (and the closest known
one); settings as `dvc exp run -S` writes them; the flat `section.key` view MLflow logs."""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from lstm_textgen.params.base import ParamsError
from lstm_textgen.params.root import Params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError naming every bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    return parse_params(raw, source=str(path))


def parse_params(raw: Any, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections (data, model, ...)")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise ParamsError(f"{source} is not valid:\n  " + "\n  ".join(lines)) from None


def with_settings(params: Params, settings: dict[str, Any]) -> Params:
    """`params` with "section.key" settings (a preset's form, as `dvc exp run -S` takes them) applied
    and validated."""
    raw = params.model_dump()
    for key, value in settings.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    return parse_params(raw)


def _describe(err: Any) -> str:
    loc = [str(part) for part in err["loc"]]
    key = ".".join(loc) or "params"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _keys_at(Params, loc[:-1])
        match = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
        if match:
            return f"{key}: unknown key (did you mean {'.'.join([*loc[:-1], match[0]])}?)"
        return f"{key}: unknown key; allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = err["msg"].removeprefix("Value error, ")
    hint = ""
    if kind == "literal_error" and isinstance(err.get("input"), str):
        options = [o.strip("' ") for o in err["ctx"]["expected"].replace(" or ", ",").split(",")]
        match = difflib.get_close_matches(err["input"], options, n=1, cutoff=0.5)
        hint = f" (did you mean {match[0]}?)" if match else ""
    if kind.startswith("value_error") or kind == "assertion_error":
        named = re.match(r"^([\w.]+): (.*)$", message, flags=re.S)
        if named:  # validators name the key they check, relative to the section or absolute
            sub, message = named.groups()
            key = sub if "." in sub else f"{key}.{sub}" if loc else sub
        return f"{key}: {message}"
    return f"{key}: {message[0].lower()}{message[1:]}, got {err.get('input')!r}{hint}"


def _keys_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The keys allowed at `loc` in the schema, for 'did you mean' hints."""
    annotation: Any = model
    for part in loc:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = {f.alias or name: f for name, f in annotation.model_fields.items()}
            if part not in fields:
                return []
            annotation = fields[part].annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return []
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [f.alias or name for name, f in annotation.model_fields.items()]
    return []


def marked_keys(section: type[BaseModel], marker: dict[str, bool], prefix: str = "") -> frozenset[str]:
    """The keys of `section` whose field carries `marker` (e.g. `marked_keys(TrainParams, RESUMABLE,
    "train.")`)."""
    return frozenset(
        f"{prefix}{name}"
        for name, field in section.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and marker.items() <= field.json_schema_extra.items()
    )


def scalar_type(annotation: Any) -> type:
    """int, float or str: a scalar field's values once `| None` is set aside (Literal choices: str).
    The served request's column types and the sample command's flags are read from it."""
    if typing.get_origin(annotation) is Literal:
        return str
    kinds = set(typing.get_args(annotation)) or {annotation}
    return int if int in kinds else float if float in kinds else str


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'layers': 2}} -> {'model.layers': 2}: the names MLflow and `dvc exp run -S` use."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat

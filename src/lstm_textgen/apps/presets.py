"""Notebook presets (presets.yaml) as `dvc exp run` commands: listed, printed, or run.

lstm-textgen presets                      # the commands, one per preset
lstm-textgen presets run anna-notebook [-S train.max_steps=5000 ...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from lstm_textgen.errors import UserError


def load_presets(path: Path = Path("presets.yaml")) -> dict[str, dict[str, Any]]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def set_args(settings: dict[str, Any]) -> list[str]:
    """['-S', 'model.layers=4', ...]: lists as JSON flow sequences, which DVC parses. DVC does not
    decode escapes such as \\n inside -S values, so presets must not hold control characters."""
    args: list[str] = []
    for key, value in settings.items():
        strings = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.isprintable() for v in strings):
            raise UserError(f"preset value {key}={value!r}: control characters cannot pass through dvc -S")
        if isinstance(value, bool) or value is None:
            text = json.dumps(value)
        elif isinstance(value, (int, float, str)):
            text = str(value)
        else:
            text = json.dumps(value)
        args += ["-S", f"{key}={text}"]
    return args


def command(name: str, presets: dict[str, dict[str, Any]], extra: list[str] | None = None) -> list[str]:
    if name not in presets:
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(presets)}")
    return ["dvc", "exp", "run", "-n", name, *set_args(presets[name]), *(extra or [])]  # extra -S win


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lstm-textgen presets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", nargs="?", choices=["list", "run"], default="list")
    parser.add_argument("name", nargs="?")
    parser.add_argument("--presets", type=Path, default=Path("presets.yaml"))
    args, extra = parser.parse_known_args(argv)
    presets = load_presets(args.presets)
    if args.action == "list":
        for name in [args.name] if args.name else presets:
            print(shlex.join(command(name, presets, ["--temp"])))
        return
    if not args.name:
        raise UserError("which preset? e.g. `lstm-textgen presets run anna-notebook`")
    sys.exit(subprocess.call(command(args.name, presets, ["--temp", *extra])))

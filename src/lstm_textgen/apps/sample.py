"""`lstm-textgen sample`: generate text from a checkpoint or a registered model, streaming characters
to the terminal as they are produced (like char-rnn's sample.lua or nanoGPT's sample.py).

    lstm-textgen sample --prompt "ROMEO:" --length 300
    lstm-textgen sample --model-uri models:/lstm-textgen-shakespeare-char@champion --strategy greedy
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from lstm_textgen.devices import resolve_device
from lstm_textgen.inference.generation import encode_prompt, sample_texts, stream_text
from lstm_textgen.model.checkpoint import LoadedModel, load_model
from lstm_textgen.params import SampleParams, Sampling, scalar_type


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-textgen sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, default=Path("data/model/model.pt"))
    source.add_argument(
        "--model-uri", help="a registered model, e.g. models:/NAME@champion (uses the MLflow store)"
    )
    parser.add_argument(
        "--prompt", action="append", help="repeat for several prompts (default: sample.prompts)"
    )
    for name in SETTING_FLAGS:
        add_setting_flag(parser, name)
    parser.add_argument("--device", default="auto")
    return parser


# Every sampling setting, and the sample stage's length and unknown-token policy, as flags.
SETTING_FLAGS = (*Sampling.model_fields, "length", "unknown", "replacement")


def add_setting_flag(parser: argparse.ArgumentParser, name: str) -> None:
    """`--name`, typed and described as params.py declares `sample.name`; unset, it takes the model's
    own `sample.*` value (the seed excepted: unset, each run differs)."""
    field = SampleParams.model_fields[name]
    options: dict[str, Any] = {
        "default": None,
        "help": f"{field.description or name} (default: sample.{name})",
    }
    if typing.get_origin(field.annotation) is Literal:
        options["choices"] = list(typing.get_args(field.annotation))
    else:
        options["type"] = scalar_type(field.annotation)
    parser.add_argument("--" + name.replace("_", "-"), **options)


def load(args: argparse.Namespace) -> LoadedModel:
    device = resolve_device(args.device)
    if args.model_uri is None:
        return load_model(args.checkpoint, device)
    from lstm_textgen.tracking.registry import load_registered

    return load_registered(args.model_uri, device)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    loaded = load(args)
    defaults = loaded.params.sample
    pick = lambda value, default: default if value is None else value  # noqa: E731
    chosen = {name: pick(getattr(args, name), getattr(defaults, name)) for name in Sampling.model_fields}
    sampling = Sampling.checked(**{**chosen, "seed": args.seed})
    prompts = args.prompt or defaults.prompts
    length = pick(args.length, defaults.length)
    unknown, replacement = pick(args.unknown, defaults.unknown), pick(args.replacement, defaults.replacement)
    if len(prompts) > 1:
        texts = sample_texts(
            loaded.model,
            loaded.vocab,
            prompts,
            length=length,
            sampling=sampling,
            unknown=unknown,
            replacement=replacement,
        )
        for prompt, text in zip(prompts, texts, strict=True):
            print(f"=== {prompt!r} ===\n{prompt}{text}\n")
        return
    ids = encode_prompt(prompts[0], loaded.vocab, unknown, replacement)
    sys.stdout.write(prompts[0])
    for piece in stream_text(loaded.model, loaded.vocab, ids, length, sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")

"""`lstm-textgen sample`: generate text from a checkpoint or a registered model, streaming characters
to the terminal as they are produced (like char-rnn's sample.lua or nanoGPT's sample.py).

    lstm-textgen sample --prompt "ROMEO:" --length 300
    lstm-textgen sample --model-uri models:/lstm-textgen-shakespeare-char@champion --strategy greedy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lstm_textgen.devices import resolve_device
from lstm_textgen.inference.generation import encode_prompt, sample_texts, stream_text
from lstm_textgen.model.checkpoint import LoadedModel, load_model
from lstm_textgen.params import Sampling


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument(
        "--length", type=int, default=None, help="new tokens per prompt (default: sample.length)"
    )
    parser.add_argument("--strategy", choices=["sample", "greedy", "mode"], default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--draws", type=int, default=None, help="mode strategy: draws per token")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--unknown", choices=["error", "skip", "replace"], default=None)
    parser.add_argument("--replacement", default=None)
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> LoadedModel:
    device = resolve_device(args.device)
    if args.model_uri is None:
        return load_model(args.checkpoint, device)
    from lstm_textgen.tracking.registry import load_registered

    return load_registered(args.model_uri, device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    loaded = load(args)
    defaults = loaded.params.sample
    pick = lambda value, default: default if value is None else value  # noqa: E731
    sampling = Sampling.checked(
        strategy=pick(args.strategy, defaults.strategy),
        temperature=pick(args.temperature, defaults.temperature),
        top_k=pick(args.top_k, defaults.top_k),
        top_p=pick(args.top_p, defaults.top_p),
        draws=pick(args.draws, defaults.draws),
        seed=args.seed,
    )
    prompts = args.prompt or defaults.prompts
    length = pick(args.length, defaults.length)
    unknown, replacement = pick(args.unknown, defaults.unknown), pick(args.replacement, defaults.replacement)
    if len(prompts) > 1:
        texts = sample_texts(loaded.model, loaded.vocab, prompts, length, sampling, unknown, replacement)
        for prompt, text in zip(prompts, texts, strict=True):
            print(f"=== {prompt!r} ===\n{prompt}{text}\n")
        return
    ids = encode_prompt(prompts[0], loaded.vocab, unknown, replacement)
    sys.stdout.write(prompts[0])
    for piece in stream_text(loaded.model, loaded.vocab, ids, length, sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")

"""`lstm-textgen score`: how likely a model finds a text, in bits per character and per token,
perplexity and total nats; `--tokens` adds every token's log-probability.

    lstm-textgen score --model models:/lstm-textgen-shakespeare-char@champion hamlet.txt
    echo "To be, or not to be" | lstm-textgen score --tokens -
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lstm_textgen.devices import resolve_device
from lstm_textgen.errors import UserError
from lstm_textgen.inference.scoring import TextScore, score_loaded


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lstm-textgen score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="data/model/model.pt",
        help="a checkpoint path, or a model URI (models:/NAME@champion, models:/NAME/3, runs:/ID/model)",
    )
    parser.add_argument("file", help="the text file to score, or - for standard input")
    parser.add_argument("--tokens", action="store_true", help="also list each token's log-probability")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--unknown", choices=["error", "skip", "replace"], default=None)
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def read_text(file: str) -> str:
    if file == "-":
        return sys.stdin.read()
    path = Path(file)
    if not path.is_file():
        raise UserError(f"{file}: no such file to score")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{file}: not valid UTF-8 at byte {exc.start}; convert it to UTF-8") from None


def report(score: TextScore, tokens: bool) -> str:
    lines = [
        f"bits per character {score.bits_per_character:.4f}",
        f"bits per token     {score.bits_per_token:.4f}",
        f"perplexity         {score.perplexity:.3f}",
        f"nats               {score.nats:.2f} over {score.predicted:,} predicted of {score.tokens:,} tokens "
        f"({score.characters:,} characters)",
    ]
    if score.unknown:
        lines.append(f"unknown tokens     {score.unknown:,} (outside the vocabulary; see --unknown)")
    if tokens and score.token_logprobs is not None:
        lines += ["", "token\tlogprob\tbits"]
        lines += [f"{t!r}\t{lp:.4f}\t{-lp / math.log(2):.3f}" for t, lp in score.token_logprobs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from lstm_textgen.tracking.registry import load_source  # imports mlflow: only once the arguments are good

    loaded = load_source(args.model, resolve_device(args.device))
    score = score_loaded(loaded, read_text(args.file), per_token=args.tokens, unknown=args.unknown)
    if args.json:
        row = score.figures() | ({"token_logprobs": score.token_logprobs} if args.tokens else {})
        print(json.dumps(row))
    else:
        print(report(score, args.tokens))

"""DVC stage `prepare`: data/raw/corpus.txt -> data/prepared/{vocab.json, splits.json, train/val/test.npy}
and metrics/prepare.json, streaming (memory follows the vocabulary, not the corpus)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lstm_textgen.data.preparation import prepare_corpus
from lstm_textgen.data.source import load_resolved
from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.errors import run_main
from lstm_textgen.files import read_json, write_json
from lstm_textgen.params import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--init", type=Path, default=Path("data/init"))
    parser.add_argument("--out", type=Path, default=Path("data/prepared"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/prepare.json"))
    args = parser.parse_args()

    params = load_params(args.params)
    corpus_info = read_json(args.raw / "corpus.json")
    source = load_resolved(args.init, params, check_model=False)  # train checks the model's shape
    base = Vocabulary.from_dict(source["vocab"]) if source else None
    stats = prepare_corpus(args.raw / "corpus.txt", params.data, args.out, corpus_info=corpus_info, base=base)
    write_json(args.metrics, stats)
    counts = "/".join(f"{n:,}" for n in stats["tokens"].values())
    added = f" ({stats['added_tokens']} new to the source model)" if "added_tokens" in stats else ""
    print(
        f"prepare: {stats['level']} level, vocab {stats['vocab_size']}{added}, tokens train/val/test {counts}"
    )


if __name__ == "__main__":
    run_main(main)

"""DVC stage `download`: the selected corpus -> data/raw/corpus.txt (normalised) + corpus.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from lstm_textgen.data.corpora import acquire
from lstm_textgen.errors import run_main
from lstm_textgen.files import write_json
from lstm_textgen.params import load_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    args = parser.parse_args()

    params = load_params(args.params)
    name, spec = params.corpus_spec()
    summary = acquire(name, spec, params.download, args.out / "corpus.txt")
    summary["spec"] = spec.model_dump(exclude_defaults=True)
    write_json(args.out / "corpus.json", summary)
    print(f"download: {name}: {summary['characters']:,} characters from {summary['source']}")


if __name__ == "__main__":
    run_main(main)

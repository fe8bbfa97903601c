"""DVC stage `init`: resolve `train.init_from` into data/init/source.json (what the source is, exactly)
and data/init/source.pt (its weights, vocabulary and params; empty without a source). It runs at every
`dvc repro` (`always_changed`: a registry alias can move, a checkpoint file can be retrained) but
rewrites its outputs only when the source changed, so prepare and train re-run exactly then."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lstm_textgen.errors import run_main
from lstm_textgen.files import atomic_path, read_json, write_json
from lstm_textgen.params import load_params


def resolve(spec: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The source's checkpoint and lineage (torch is imported only when there is a source)."""
    from lstm_textgen.tracking.sources import checkpoint_digest, resolve_source

    source, lineage = resolve_source(spec)
    checkpoint = {k: source[k] for k in ("model", "vocab", "params")}
    lineage["init_from_weights_sha256"] = checkpoint_digest(checkpoint)
    lineage["init_from_vocab_size"] = str(len(source["vocab"]["tokens"]))
    return checkpoint, lineage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=Path("data/init"))
    args = parser.parse_args()

    spec = load_params(args.params).train.init_from
    checkpoint, lineage = resolve(spec) if spec else ({}, {})
    summary_path, weights_path = args.out / "source.json", args.out / "source.pt"
    if summary_path.is_file() and weights_path.is_file() and read_json(summary_path) == lineage:
        print(f"init: {spec or 'no source (train.init_from: null)'}: unchanged")
        return
    with atomic_path(weights_path, suffix=".pt") as tmp:
        if checkpoint:
            import torch

            torch.save(checkpoint, tmp)
    write_json(summary_path, lineage)
    print(f"init: {spec}: resolved {lineage}" if spec else "init: no source (train.init_from: null)")


if __name__ == "__main__":
    run_main(main)

"""The prepared dataset: vocabulary + train/val/test token arrays + their sizes, in one directory.

Written by the prepare stage (`preparation.prepare_corpus`, streaming), read by train, evaluate and
sample through `load_dataset`. Char level builds the vocabulary from the whole text (as char-rnn and
nanoGPT do, so no character is unknown); word level and BPE from the training split only, so the
val/test figures are honest; byte level needs no building (256 byte values).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.data.windows import SPLITS, load_split
from lstm_textgen.errors import UserError
from lstm_textgen.files import read_json

VOCAB_FILE = "vocab.json"
SPLITS_FILE = "splits.json"


@dataclass(frozen=True)
class Dataset:
    vocab: Vocabulary
    splits: dict[str, np.ndarray]
    stats: dict[str, Any]

    def characters_per_token(self, split: str) -> float | None:
        """Characters of text per token in `split` (None where the prepared data predates the count)."""
        sizes = self.stats.get("splits", {}).get(split)
        if not sizes or not sizes["tokens"]:
            return 1.0 if self.vocab.level == "char" else None
        return sizes["characters"] / sizes["tokens"]


def load_dataset(prepared_dir: Path, mmap: bool = True) -> Dataset:
    """Vocabulary, splits (memory-mapped: nothing is read until used) and their sizes."""
    vocab_path = prepared_dir / VOCAB_FILE
    if not vocab_path.is_file():
        raise UserError(f"{prepared_dir}: no prepared data (run `dvc repro prepare` first)")
    vocab = Vocabulary.from_dict(read_json(vocab_path))
    splits = {name: load_split(prepared_dir / f"{name}.npy", mmap) for name in SPLITS}
    for name, ids in splits.items():
        largest = _largest(ids)
        if largest >= len(vocab):
            raise UserError(
                f"{prepared_dir / (name + '.npy')} holds token id {largest}, but {vocab_path} has only "
                f"{len(vocab)} tokens: the two do not belong together (edited or mixed up); "
                "run `dvc repro -f prepare`"
            )
    sizes_path = prepared_dir / SPLITS_FILE
    stats = {"splits": read_json(sizes_path)} if sizes_path.is_file() else {}
    return Dataset(vocab, splits, stats)


def _largest(ids: np.ndarray, block: int = 1 << 24) -> int:
    """The largest id, read a block at a time (a memory-mapped split is never loaded whole)."""
    return max((int(ids[i : i + block].max()) for i in range(0, len(ids), block)), default=-1)

"""The prepared dataset: vocabulary + train/val/test token arrays + statistics, in one directory.

Written by the prepare stage, read by train, evaluate and sample through `load_dataset`.
Char level builds the vocabulary from the whole text (as char-rnn and nanoGPT do, so no character is
unknown); word level builds it from the training split only, so the val/test OOV rates are honest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lstm_textgen.errors import UserError
from lstm_textgen.files import read_json, write_json
from lstm_textgen.params import DataParams
from lstm_textgen.vocab import Vocabulary, tokenize
from lstm_textgen.windows import SPLITS, load_split, save_split, split, split_sizes

VOCAB_FILE = "vocab.json"


@dataclass(frozen=True)
class Dataset:
    vocab: Vocabulary
    splits: dict[str, np.ndarray]
    stats: dict[str, Any]


def build_dataset(text: str, data: DataParams, corpus_info: dict[str, Any] | None = None) -> Dataset:
    text = text.lower() if data.lowercase else text
    if data.level == "char":
        vocab = Vocabulary.build(text, "char", data.lowercase)
        splits = split(vocab.encode(text), data.val_fraction, data.test_fraction)
        oov = dict.fromkeys(SPLITS, 0.0)
    else:
        tokens = tokenize(text, "word")
        sizes = split_sizes(len(tokens), data.val_fraction, data.test_fraction)
        vocab = Vocabulary.build(tokens[: sizes.train], "word", data.lowercase, data.min_freq, data.max_vocab)
        splits = split(vocab.encode_tokens(tokens), data.val_fraction, data.test_fraction)
        oov = {name: float(np.mean(ids == 0)) if len(ids) else 0.0 for name, ids in splits.items()}
    real_tokens = [t for t in vocab.tokens if t != vocab.unk]
    if len(real_tokens) < 2:
        raise UserError(
            f"the corpus has {len(real_tokens)} distinct {data.level} token(s) "
            f"({', '.join(map(repr, real_tokens[:1])) or 'none'}): there is nothing to predict; use a "
            "corpus with at least two (data.corpus), or lower data.min_freq at word level"
        )
    stats: dict[str, Any] = {
        "level": data.level,
        "vocab_size": len(vocab),
        "bytes_per_token": vocab.dtype.itemsize,
        "characters": len(text),
        "tokens": {name: len(ids) for name, ids in splits.items()},
        "oov_rate": oov,
    }
    if corpus_info:
        stats["corpus"] = {k: corpus_info[k] for k in ("name", "source", "text_sha256") if k in corpus_info}
    return Dataset(vocab, splits, stats)


def save_dataset(dataset: Dataset, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, ids in dataset.splits.items():
        save_split(out_dir / f"{name}.npy", ids)
    write_json(out_dir / VOCAB_FILE, dataset.vocab.to_dict())


def load_dataset(prepared_dir: Path, mmap: bool = True) -> Dataset:
    """Vocabulary and splits; the statistics live in the prepare stage's metrics file."""
    vocab_path = prepared_dir / VOCAB_FILE
    if not vocab_path.is_file():
        raise UserError(f"{prepared_dir}: no prepared data (run `dvc repro prepare` first)")
    vocab = Vocabulary.from_dict(read_json(vocab_path))
    splits = {name: load_split(prepared_dir / f"{name}.npy", mmap) for name in SPLITS}
    for name, ids in splits.items():
        largest = int(ids.max()) if len(ids) else -1
        if largest >= len(vocab):
            raise UserError(
                f"{prepared_dir / (name + '.npy')} holds token id {largest}, but {vocab_path} has only "
                f"{len(vocab)} tokens: the two do not belong together (edited or mixed up); "
                "run `dvc repro -f prepare`"
            )
    return Dataset(vocab, splits, {})

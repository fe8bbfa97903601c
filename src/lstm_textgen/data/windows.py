"""Token arrays on disk: the splits' sizes, files, and whether a window fits in one.

Splits are contiguous ranges (train, then validation, then test at the tail, as char-rnn and nanoGPT
do). Each split is a .npy file of the narrowest unsigned dtype, memory-mappable. Training draws its
windows by indexing the split on the device (`train/batches.py`); evaluation reads it in streams
(`inference/evaluation.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstm_textgen.errors import UserError
from lstm_textgen.files import atomic_path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSizes:
    train: int
    val: int
    test: int


def split_sizes(total: int, val_fraction: float, test_fraction: float) -> SplitSizes:
    val = int(total * val_fraction)
    test = int(total * test_fraction)
    return SplitSizes(total - val - test, val, test)


def save_split(path: Path, ids: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp, tmp.open("wb") as out:
        np.save(out, ids, allow_pickle=False)


def load_split(path: Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def check_fits(num_tokens: int, seq_len: int, split_name: str) -> None:
    if num_tokens < seq_len + 1:
        raise UserError(
            f"data.seq_len: {seq_len} is too long for the {split_name} split of {num_tokens} tokens "
            f"(a window needs seq_len + 1); lower data.seq_len or raise data.val_fraction/test_fraction"
        )

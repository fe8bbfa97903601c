"""Token arrays on disk and the windows over them.

Splits are contiguous ranges (train, then validation, then test at the tail, as char-rnn and nanoGPT
do). Each split is a .npy file of the narrowest unsigned dtype, memory-mappable. A window of `seq_len`
inputs and its targets shifted by one are views over that array, never copies.
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


def split(ids: np.ndarray, val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """Contiguous, non-overlapping views: train | val | test."""
    sizes = split_sizes(len(ids), val_fraction, test_fraction)
    a, b = sizes.train, sizes.train + sizes.val
    return {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}


def save_split(path: Path, ids: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp, tmp.open("wb") as out:
        np.save(out, ids, allow_pickle=False)


def load_split(path: Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def window_views(tokens: np.ndarray, seq_len: int, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each [num_windows, seq_len]: targets[i, t] == inputs[i, t + 1] == tokens[...].

    Both are strided views of `tokens`; nothing is copied.
    """
    check_fits(len(tokens), seq_len, "tokens")
    both = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::stride]
    return both[:, :-1], both[:, 1:]


def check_fits(num_tokens: int, seq_len: int, split_name: str) -> None:
    if num_tokens < seq_len + 1:
        raise UserError(
            f"data.seq_len: {seq_len} is too long for the {split_name} split of {num_tokens} tokens "
            f"(a window needs seq_len + 1); lower data.seq_len or raise data.val_fraction/test_fraction"
        )

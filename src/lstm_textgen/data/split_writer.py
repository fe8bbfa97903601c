"""Token ids written to the train, val and test files as they come (contiguous splits, cut by token
count), in the narrowest dtype, each file written whole or not at all; and read back in blocks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lstm_textgen.data.windows import SPLITS, SplitSizes
from lstm_textgen.files import atomic_path


@dataclass
class SplitWriter:
    """Fills train.npy, val.npy and test.npy in order with the ids it is given, counting per split
    the characters they stand for and the unknown tokens among them. Written as plain appends after
    each file's .npy header (not through a memory map, whose written pages would count as the
    process's resident memory)."""

    sizes: SplitSizes
    files: dict[str, BinaryIO]
    dtype: np.dtype[Any]
    unk_id: int | None = None
    filled: int = 0
    characters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    unknown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))

    def write(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> None:
        """`lengths[i]`: characters of token i (None: one each)."""
        start, begin = 0, 0
        for name in SPLITS:
            end = begin + getattr(self.sizes, name)
            lo, hi = max(begin, self.filled), min(end, self.filled + len(ids) - start)
            begin = end
            if lo >= hi:
                continue
            part = ids[start : start + hi - lo]
            self.files[name].write(np.ascontiguousarray(part, dtype=self.dtype).tobytes())
            self.characters[name] += (
                int(lengths[start : start + hi - lo].sum()) if lengths is not None else len(part)
            )
            if self.unk_id is not None:
                self.unknown[name] += int(np.count_nonzero(part == self.unk_id))
            start += hi - lo
            self.filled = hi
        if start != len(ids):
            raise AssertionError(f"{len(ids) - start} ids beyond the counted total")

    def split_summary(self) -> dict[str, dict[str, int]]:
        return {n: {"tokens": getattr(self.sizes, n), "characters": self.characters[n]} for n in SPLITS}


@contextlib.contextmanager
def split_writer(
    out_dir: Path, sizes: SplitSizes, dtype: np.dtype[Any], unk_id: int | None = None
) -> Iterator[SplitWriter]:
    """The three .npy files, each renamed into `out_dir` when complete (and all ids are written)."""
    with contextlib.ExitStack() as stack:
        files = {}
        for name in SPLITS:
            tmp = stack.enter_context(atomic_path(out_dir / f"{name}.npy", suffix=".npy"))
            files[name] = stack.enter_context(tmp.open("wb"))
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
            np.lib.format.write_array_header_1_0(files[name], header | {"shape": (getattr(sizes, name),)})
        writer = SplitWriter(sizes, files, dtype, unk_id)
        yield writer
        if writer.filled != sizes.train + sizes.val + sizes.test:
            raise AssertionError(f"{writer.filled} ids written of {sizes}")


def read_blocks(
    path: Path, dtype: np.dtype[Any], stop: int | None = None, size: int = 1 << 22
) -> Iterator[np.ndarray]:
    """The ids of a raw scratch file (up to `stop`), a block at a time, read (not memory-mapped)."""
    with path.open("rb") as file:
        left = path.stat().st_size // dtype.itemsize if stop is None else stop
        while left > 0:
            block = np.fromfile(file, dtype=dtype, count=min(size, left))
            if not len(block):
                return
            left -= len(block)
            yield block

"""The corpus read in pieces of about a chunk, each cut right after a line break that has non-space
characters on both sides, so that no token of any level straddles two pieces and lowercasing a piece
equals lowercasing the whole; one giant line is cut anyway after a few chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from lstm_textgen.data.normalise import CHUNK_BYTES, file_chunks

# A text with no safe cut in this many chunks (and at least MIN_FORCED_CUT characters) is cut anyway:
# one giant line must not hold the whole corpus in memory (a word there may then be split in two).
MAX_CARRY = 8
MIN_FORCED_CUT = 1 << 22

Pieces = Callable[[], Iterator[str]]


def safe_cut(text: str) -> int:
    """The position after the last line break with non-space characters on both sides (0: none)."""
    at = text.rfind("\n", 0, len(text) - 1)
    while at > 0:
        if not text[at - 1].isspace() and not text[at + 1].isspace():
            return at + 1
        at = text.rfind("\n", 0, at)
    return 0


def safe_pieces(chunks: Iterator[str], chunk_chars: int) -> Iterator[str]:
    """`chunks` re-cut at safe places (see the module's docstring); each piece is copied once."""
    held: list[str] = []  # text since the last cut
    held_chars = 0
    for chunk in chunks:
        cut = safe_cut(chunk)  # safe in the whole text too (a cut at a chunk's seam is just missed)
        forced = held_chars + len(chunk) > max(MAX_CARRY * chunk_chars, MIN_FORCED_CUT)
        if cut or forced:
            cut = cut or len(chunk)
            yield "".join([*held, chunk[:cut]])
            held, held_chars = [chunk[cut:]], len(chunk) - cut
        else:
            held.append(chunk)
            held_chars += len(chunk)
    if held_chars:
        yield "".join(held)


def text_pieces(path: Path, lowercase: bool, chunk_bytes: int = CHUNK_BYTES) -> Pieces:
    """A re-iterable source of the corpus's (lowercased) text pieces."""

    def pieces() -> Iterator[str]:
        for piece in safe_pieces(file_chunks(path, chunk_bytes), chunk_bytes):
            yield piece.lower() if lowercase else piece

    return pieces


def sub_pieces(text: str, size: int) -> list[str]:
    """`text` cut at safe places into pieces of about `size` characters (for parallel encoding)."""
    out, start = [], 0
    while len(text) - start > size:
        cut = safe_cut(text[start : start + size])
        if not cut:
            break
        out.append(text[start : start + cut])
        start += cut
    return [*out, text[start:]]

"""Streaming normalisation: a downloaded file (plain or compressed) -> UTF-8 text with LF line endings,
CSV columns picked, a Project Gutenberg header/footer dropped, in chunks of bounded size.

Memory depends on the chunk size, never on the corpus: each pass reads a file and writes a file.
Chunk boundaries are made harmless where they could matter: the incremental UTF-8 decoder holds back
a split multi-byte sequence (and a split BOM), a chunk ending in '\\r' keeps it for the next one (a
split CRLF stays one line break), and the Gutenberg markers are searched in pieces cut after a line
break, so a marker line is never seen in halves.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import hashlib
import lzma
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from lstm_textgen.errors import UserError

CHUNK_BYTES = 1 << 24
# A line longer than this is read and written in pieces, and counted as `long_lines` in the
# corpus's summary (its text is kept whole; Gutenberg markers are never looked for inside it).
MAX_LINE_CHARACTERS = 1 << 22
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)
_GUTENBERG_END_LINE = re.compile(r"^End of (the )?Project Gutenberg.*$", re.M | re.I)
# Every 'End of Project Gutenberg' line holds one of these, lowercased (no letter of them has a
# non-ASCII case variant, so comparing lowercased ASCII bytes finds what the regex finds).
_CLOSING_NEEDLES = (b"end of project gutenberg", b"end of the project gutenberg")
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"PK\x03\x04": "zip"}


class CorpusError(UserError):
    """The corpus cannot be read as the params say (encoding, format, columns, archive)."""


# --------------------------------------------------------------------------------------------------
# Reading: compressed archives as streams, capped


def compression(path: Path) -> str | None:
    """'gzip', 'bzip2', 'xz' or 'zip' by the file's first bytes (URLs often hide the suffix)."""
    with path.open("rb") as file:
        head = file.read(8)
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


@contextlib.contextmanager
def open_source(path: Path, member: str | None, label: str, max_bytes: int) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed on the fly; more than `max_bytes` of them is an error."""
    kind = compression(path)
    with contextlib.ExitStack() as stack:
        if kind == "zip":
            try:
                archive = stack.enter_context(zipfile.ZipFile(path))
                stream: IO[bytes] = stack.enter_context(archive.open(zip_member(archive, member, label)))
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
                raise CorpusError(f"{label}: the zip archive is corrupt: {exc}") from None
        elif kind is not None:
            opener = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}[kind]
            stream = stack.enter_context(opener(path, "rb"))
        else:
            if member is not None:
                raise CorpusError(f"{label}: 'member' is set but the file is not a zip archive")
            stream = stack.enter_context(path.open("rb"))
        yield _Capped(stream, max_bytes, label, kind)


def zip_member(archive: zipfile.ZipFile, member: str | None, label: str) -> str:
    files = [info.filename for info in archive.infolist() if not info.is_dir()]
    if member is None and len(files) == 1:
        return files[0]
    if member is not None and member in files:
        return member
    listed = ", ".join(files[:10]) + (" ..." if len(files) > 10 else "")
    what = f"has no member {member!r}" if member else f"holds {len(files)} files"
    raise CorpusError(f"{label}: the zip archive {what}; name one in the corpus's 'member' ({listed})")


class _Capped:
    """A read-only stream that refuses to yield more than `max_bytes` (a zip bomb stops early)."""

    def __init__(self, stream: IO[bytes], max_bytes: int, label: str, kind: str | None) -> None:
        self.stream, self.max_bytes, self.label, self.kind, self.seen = stream, max_bytes, label, kind, 0

    def read(self, size: int) -> bytes:
        try:
            data = self.stream.read(size)
        except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile, zlib.error) as exc:
            raise CorpusError(f"{self.label}: the {self.kind or 'file'} data is corrupt: {exc}") from None
        self.seen += len(data)
        if self.seen > self.max_bytes:
            raise CorpusError(
                f"{self.label}: more than {self.max_bytes:,} bytes of text, the size cap "
                "(raise download.max_mb)"
            )
        return data


def decoded_chunks(stream: Any, label: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """UTF-8 text (a BOM dropped), LF line endings; a clear error for binary or non-UTF-8 input."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    offset, held = 0, ""
    while True:
        raw = stream.read(chunk_bytes)
        if offset == 0 and b"\x00" in raw[:4096]:
            raise CorpusError(f"{label}: contains NUL bytes, so it is binary or UTF-16, not UTF-8 text")
        pending = len(decoder.getstate()[0])  # bytes of a sequence the last chunk left unfinished
        try:
            text = held + decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            at = offset - pending + exc.start
            raise CorpusError(
                f"{label}: not valid UTF-8 at byte {at:,} ({exc.object[exc.start : exc.start + 4]!r}); "
                "convert the file to UTF-8"
            ) from None
        offset += len(raw)
        held = "\r" if raw and text.endswith("\r") else ""
        text = text[: len(text) - len(held)]
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if text:
            yield text
        if not raw:
            return


def line_pieces(chunks: Iterable[str], limit: int | None = None) -> Iterator[str]:
    """The same text, re-cut so that every piece but the last ends with a line break, except within
    a line longer than `limit` characters (MAX_LINE_CHARACTERS), which passes on in pieces: memory
    follows the chunk even in a file without line breaks."""
    limit = MAX_LINE_CHARACTERS if limit is None else limit
    carry = ""
    for chunk in chunks:
        text = carry + chunk
        cut = text.rfind("\n") + 1
        if not cut and len(text) > limit:
            cut = len(text)
        if cut:
            yield text[:cut]
        carry = text[cut:]
    if carry:
        yield carry


def file_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """The text of an already normalised UTF-8 file, in pieces."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as file:
        while raw := file.read(chunk_bytes):
            if text := decoder.decode(raw):
                yield text
        if tail := decoder.decode(b"", final=True):
            yield tail


# --------------------------------------------------------------------------------------------------
# Writing: a text file with its summary and where the Gutenberg markers are


@dataclass
class Markers:
    """Byte offsets of the Gutenberg markers, found as `strip_gutenberg` would in the whole text."""

    start: tuple[int, int] | None = None  # the first START line (begin, end)
    end_before_start: int | None = None  # the first END line when no START precedes it
    end: int | None = None  # the first END line after the first START
    closing: list[int] = field(default_factory=list)  # every 'End of Project Gutenberg' line

    @property
    def present(self) -> bool:
        return self.start is not None or self.end_before_start is not None or self.end is not None

    def kept_range(self, size: int) -> tuple[int, int]:
        """[begin, end) of the text between the header and the footer."""
        begin = self.start[1] if self.start else 0
        end = self.end if self.start else self.end_before_start
        if end is None:
            return begin, size
        closing = [c for c in self.closing if begin <= c < end]
        return begin, closing[-1] if closing else end

    def scan(self, piece: str, offset: int, encoded: bytes | None = None) -> None:
        """Record the markers of `piece` (whole lines, `encoded` its UTF-8), which starts at byte
        `offset`."""
        header_footer = "***" in piece
        lowered = (encoded if encoded is not None else piece.encode("utf-8")).lower()
        closing = any(needle in lowered for needle in _CLOSING_NEEDLES)
        if not (header_footer or closing):  # the common case, at memory speed (the regexes are slow)
            return

        def at(i: int) -> int:
            return offset + len(piece[:i].encode("utf-8"))

        starts = _GUTENBERG_START.finditer(piece) if header_footer else ()
        for match in starts:
            if self.start is None:
                self.start = (at(match.start()), at(match.end()))
        for match in _GUTENBERG_END.finditer(piece) if header_footer else ():
            where = at(match.start())
            if self.start is None and self.end_before_start is None:
                self.end_before_start = where
            elif self.start is not None and self.end is None and where >= self.start[1]:
                self.end = where
        if closing:
            self.closing.extend(at(m.start()) for m in _GUTENBERG_END_LINE.finditer(piece))


class TextSink:
    """Writes text pieces to an open binary file, keeping its sha256, size and the markers."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.bytes = self.characters = self.lines = 0
        self.blank = True
        self.markers = Markers()
        self._partial = ""  # the unfinished last line, scanned once it is complete
        self.long_lines = 0  # lines over MAX_LINE_CHARACTERS: not held, not scanned
        self.counted: dict[str, int] = {}  # what the reader replaced on the way, by kind
        self._in_long_line = False

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        self.out.write(data)
        self.digest.update(data)
        self.characters += characters_in(data)
        self.lines += data.count(b"\n")
        if text and self.blank:
            self.blank = text.isspace()
        if self._in_long_line:  # the rest of a line too long to hold: skip to its end
            end = text.find("\n") + 1
            if not end:
                self.bytes += len(data)
                return
            self._in_long_line = False
            self.bytes += len(text[:end].encode("utf-8"))
            text, data = text[end:], data[len(text[:end].encode("utf-8")) :]
        partial = self._partial.encode("utf-8")
        lines, lines_offset = self._partial + text, self.bytes - len(partial)
        cut = lines.rfind("\n") + 1
        if cut == len(lines):  # the usual case: the piece ends a line, and its bytes are at hand
            self.markers.scan(lines, lines_offset, partial + data)
        elif cut:
            self.markers.scan(lines[:cut], lines_offset)
        self._partial = lines[cut:]
        self.bytes += len(data)
        if len(self._partial) > MAX_LINE_CHARACTERS:
            self._partial, self._in_long_line = "", True
            self.long_lines += 1

    def close(self) -> None:
        if self._partial:
            self.markers.scan(self._partial, self.bytes - len(self._partial.encode("utf-8")))
            self._partial = ""

    def summary(self) -> dict[str, Any]:
        summary = {"text_sha256": self.digest.hexdigest(), "characters": self.characters, "lines": self.lines}
        return summary | ({"long_lines": self.long_lines} if self.long_lines else {}) | self.counted


def characters_in(data: bytes) -> int:
    """Characters of UTF-8 `data`: every byte but the continuation bytes (0b10xxxxxx)."""
    if not data:
        return 0
    return int(np.count_nonzero((np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80))


def write_pieces(pieces: Iterable[str], path: Path) -> TextSink:
    with path.open("wb") as out:
        sink = TextSink(out)
        for piece in pieces:
            sink.write(piece)
        sink.close()
    return sink


def copy_range(source: Path, begin: int, end: int, path: Path, chunk_bytes: int = CHUNK_BYTES) -> TextSink:
    """Bytes [begin, end) of `source` without leading/trailing line breaks, plus one final '\\n'."""
    with source.open("rb") as file:
        while begin < end:
            file.seek(begin)
            if file.read(1) != b"\n":
                break
            begin += 1
        while end > begin:
            file.seek(max(begin, end - 4096))
            block = file.read(end - max(begin, end - 4096))
            trimmed = block.rstrip(b"\n")
            end -= len(block) - len(trimmed)
            if trimmed:
                break

        def pieces() -> Iterator[str]:
            file.seek(begin)
            decoder, left = codecs.getincrementaldecoder("utf-8")(), end - begin
            while left > 0:
                raw = file.read(min(chunk_bytes, left))
                left -= len(raw)
                yield decoder.decode(raw, final=left <= 0)
            yield "\n"

        return write_pieces(pieces(), path)

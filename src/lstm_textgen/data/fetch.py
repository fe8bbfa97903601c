"""Verified downloads: stream to a temporary file, retry transient failures with backoff, cap the size,
check sha256, then rename. A failed download leaves nothing at the destination.

Hand-written on requests rather than pooch because the stage needs what pooch lacks: a size cap,
retries only for transient failures (connection errors, timeouts, 408/429/5xx, truncated bodies) and
an immediate, clear failure for a 404 or a checksum mismatch.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from lstm_textgen.errors import UserError
from lstm_textgen.files import atomic_path

DOWNLOAD_CHUNK_BYTES = 1 << 16
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(UserError):
    """A download or copy failed; the message says why and what to change."""


class _Transient(Exception):
    """A failure worth retrying (network hiccup, overloaded server, truncated body)."""


def fetch(
    source: str,
    dest: Path,
    *,
    sha256: str | None = None,
    timeout_s: float = 30.0,
    retries: int = 3,
    max_bytes: int = 16 * 2**30,
    backoff_s: float = 1.0,
    key: str = "sha256",
) -> str:
    """Copy `source` (https/http URL, file:// URL or local path) to `dest`; return its sha256.

    `key` is the params key that holds the expected hash, named in the mismatch message.
    """
    scheme = urlparse(source).scheme
    with atomic_path(dest) as tmp:
        if scheme in ("http", "https"):
            actual = _download_with_retries(
                source, tmp, timeout_s=timeout_s, retries=retries, max_bytes=max_bytes, backoff_s=backoff_s
            )
        elif scheme in ("file", ""):
            actual = _copy_local(_local_path(source), tmp, max_bytes)
        else:
            raise DownloadError(f"{source}: unsupported scheme {scheme!r}; use https://, file:// or a path")
        _check_sha256(source, sha256, actual, key)
    return actual


def local_file(source: str) -> Path | None:
    """The path a file:// URL or plain path names; None for a network URL."""
    return _local_path(source) if urlparse(source).scheme in ("file", "") else None


def verify_local(path: Path, sha256: str | None, max_bytes: int, key: str = "sha256") -> str:
    """Check a local source in place (no copy: a corpus of gigabytes is read, not duplicated)."""
    _check_local(path, max_bytes)
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(DOWNLOAD_CHUNK_BYTES * 16):
            digest.update(chunk)
    actual = digest.hexdigest()
    _check_sha256(str(path), sha256, actual, key)
    return actual


def _check_sha256(source: str, expected: str | None, actual: str, key: str) -> None:
    if expected is not None and actual != expected.lower():
        raise DownloadError(
            f"checksum mismatch for {source}: expected sha256 {expected}, got {actual}. "
            f"The file changed or is corrupt; if the new content is intended, set {key} to {actual}"
        )


def _check_room(url: str, directory: Path, size: int) -> None:
    free = shutil.disk_usage(directory).free
    if size > free:
        raise DownloadError(
            f"{url}: {size / 2**20:,.0f} MB would not fit: {directory} has {free / 2**20:,.0f} MB free; "
            "free some space or lower download.max_mb to refuse such files"
        )


def _check_local(path: Path, max_bytes: int) -> None:
    if not path.is_file():
        raise DownloadError(f"{path}: file not found (check data.corpus or the corpus's source)")
    size = path.stat().st_size
    if size > max_bytes:
        raise DownloadError(f"{path}: {size:,} bytes is over the size cap {max_bytes:,} (download.max_mb)")


def _local_path(source: str) -> Path:
    parsed = urlparse(source)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(source).expanduser()


def _copy_local(path: Path, tmp: Path, max_bytes: int) -> str:
    _check_local(path, max_bytes)
    digest = hashlib.sha256()
    with path.open("rb") as src, tmp.open("wb") as out:
        while chunk := src.read(DOWNLOAD_CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _download_with_retries(
    url: str, tmp: Path, *, timeout_s: float, retries: int, max_bytes: int, backoff_s: float
) -> str:
    for attempt in range(retries + 1):
        try:
            return _download_once(url, tmp, timeout_s, max_bytes)
        except _Transient as exc:
            if attempt == retries:
                raise DownloadError(f"{url}: {exc} (gave up after {retries + 1} attempts)") from None
            wait = backoff_s * 2**attempt
            print(f"download: {exc}; retrying in {wait:.1f} s ({attempt + 1}/{retries})", flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _download_once(url: str, tmp: Path, timeout_s: float, max_bytes: int) -> str:
    host = urlparse(url).netloc
    try:
        with requests.get(url, stream=True, timeout=(timeout_s, timeout_s)) as response:
            if response.status_code in TRANSIENT_STATUS:
                raise _Transient(f"HTTP {response.status_code} {response.reason}")
            if response.status_code >= 400:
                raise DownloadError(
                    f"{url}: HTTP {response.status_code} {response.reason} "
                    "(check the corpus's source URL in params.yaml)"
                )
            expected = int(response.headers.get("Content-Length") or 0) or None
            if expected is not None and expected > max_bytes:
                raise DownloadError(
                    f"{url}: {expected:,} bytes is over the size cap {max_bytes:,} (raise download.max_mb)"
                )
            if expected is not None:
                _check_room(url, tmp.parent, expected)
            return _stream_body(response, tmp, expected, max_bytes, url)
    except requests.exceptions.Timeout:
        raise _Transient(f"no answer from {host} within {timeout_s:g} s (download.timeout_s)") from None
    except requests.exceptions.ConnectionError as exc:
        if "Read timed out" in str(exc):
            raise _Transient(f"no data from {host} within {timeout_s:g} s (download.timeout_s)") from None
        raise _Transient(f"cannot reach {host}: {_root_cause(exc)}") from None
    except requests.exceptions.ChunkedEncodingError as exc:
        raise _Transient(f"connection to {host} closed mid-transfer: {_root_cause(exc)}") from None


def _stream_body(
    response: requests.Response, tmp: Path, expected: int | None, max_bytes: int, url: str
) -> str:
    digest = hashlib.sha256()
    received = 0
    with (
        tmp.open("wb") as out,
        tqdm(total=expected, unit="B", unit_scale=True, desc="download", disable=None, leave=False) as bar,
    ):
        for chunk in response.iter_content(DOWNLOAD_CHUNK_BYTES):
            received += len(chunk)
            if received > max_bytes:
                raise DownloadError(f"{url}: more than {max_bytes:,} bytes, the size cap (download.max_mb)")
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    if expected is not None and received < expected:
        raise _Transient(f"connection closed mid-transfer after {received:,} of {expected:,} bytes")
    return digest.hexdigest()


def _root_cause(exc: BaseException) -> str:
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    return str(exc) or type(exc).__name__

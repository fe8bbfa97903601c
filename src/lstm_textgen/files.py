"""Atomic, durable file writes: every output is written to a temporary file beside it, flushed to
the disk (fsync) and renamed into place, so a crash, a kill or a failed check never leaves a
half-written file at the output path."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lstm_textgen.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "", secret: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on error delete it.
    `secret`: the file stays 0600 (mkstemp's mode) from before its first byte to its rename."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f"{suffix}.tmp", dir=target.parent)
    except OSError as exc:
        raise _unwritable(target, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    if not secret:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        yield tmp
        _fsync(tmp)  # the bytes reach the disk before the name points at them
        os.replace(tmp, target)
        _fsync(target.parent)  # and the rename itself survives a crash
    except OSError as exc:  # a full disk, a read-only directory
        raise _unwritable(target, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def _unwritable(target: Path, exc: OSError) -> UserError:
    return UserError(
        f"cannot write {target}: {exc.strerror or exc}; free some space or fix the directory's "
        "permissions (nothing was written there)"
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike[str], text: str, secret: bool = False) -> None:
    """`text` at `path`, atomically; `secret`: readable by the owner only (0600), from the start."""
    with atomic_path(path, secret=secret) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))

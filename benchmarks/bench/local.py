"""What the benchmarks take from this machine: a corpus to measure on, a free port for a server."""

from __future__ import annotations

import socket
from pathlib import Path

from lstm_textgen.data.corpora import acquire
from lstm_textgen.params import CorpusSpec, Params


def load_corpus(spec: str, params: Params, workdir: Path) -> str:
    """A key of params.yaml's corpora (downloaded and verified), a path, or a file:// or https:// URL."""
    name, corpus = (
        (spec, params.corpora[spec]) if spec in params.corpora else (Path(spec).stem, CorpusSpec(source=spec))
    )
    acquire(name, corpus, params.download, workdir / "corpus.txt")
    return (workdir / "corpus.txt").read_text(encoding="utf-8")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

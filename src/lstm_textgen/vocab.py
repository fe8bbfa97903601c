"""Tokenisers and the vocabulary: text <-> token ids, at character or word level.

The vocabulary is saved as JSON together with its settings (level, lowercase, unknown token), so a
trained model can be used later without the corpus.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lstm_textgen.errors import UserError

Level = Literal["char", "word"]
UNK = "<unk>"
# A word-level token is a line break, or a word or punctuation mark that carries one leading space
# when whitespace preceded it (" the", as GPT-2's tokens do), so joining the tokens gives the text
# back: runs of spaces become one, spaces before a line break go, nothing else changes.
_SPACED_TOKEN = re.compile(r"([^\S\n]*)(\n|\w+(?:['’]\w+)*|[^\w\s])")
# Vocabularies saved before tokens carried their spaces: bare tokens, spaces guessed when joining.
_LEGACY_TOKEN = re.compile(r"\n|\w+(?:['’]\w+)*|[^\w\s]")
_NO_SPACE_BEFORE = set(".,;:!?)]}'’”%") | {"n't", "'s"}
_NO_SPACE_AFTER = set("([{“$#\n")


class VocabularyError(UserError):
    """Text holds tokens the vocabulary lacks."""


def tokenize(text: str, level: Level, spaced: bool = True) -> list[str]:
    """Characters, or line breaks / words / punctuation marks (with their leading space)."""
    if level == "char":
        return list(text)
    if not spaced:
        return _LEGACY_TOKEN.findall(text)
    return [
        token if token == "\n" or not space else " " + token for space, token in _SPACED_TOKEN.findall(text)
    ]


def detokenize(tokens: Sequence[str], level: Level, spaced: bool = True) -> str:
    """Join tokens back into text. `<unk>` gets a space before it (its own was lost)."""
    if level == "char":
        return "".join(tokens)
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


@dataclass(frozen=True)
class Vocabulary:
    level: Level
    tokens: tuple[str, ...]
    lowercase: bool = False
    unk: str | None = None
    spaced: bool = True  # word level: tokens carry their leading space (False: an older vocabulary)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {token: i for i, token in enumerate(self.tokens)}
        if len(index) < len(self.tokens):
            twice = sorted({t for t in self.tokens if self.tokens.count(t) > 1})[:5]
            raise VocabularyError(f"the vocabulary lists {', '.join(map(repr, twice))} more than once")
        if self.level == "char" and any(len(t) != 1 for t in self.tokens):
            raise VocabularyError("a char vocabulary holds single characters only")
        object.__setattr__(self, "_index", index)

    @classmethod
    def build(
        cls,
        tokens: Iterable[str],
        level: Level,
        lowercase: bool,
        min_freq: int = 1,
        max_size: int | None = None,
    ) -> Vocabulary:
        """Char level: every character, in code-point order. Word level: `<unk>` first, then the words
        seen at least `min_freq` times, most frequent first, at most `max_size` entries in all."""
        counts = collections.Counter(tokens)
        if level == "char":
            return cls("char", tuple(sorted(counts)), lowercase)
        kept = sorted(
            (t for t, n in counts.items() if n >= min_freq and t != UNK), key=lambda t: (-counts[t], t)
        )
        if max_size is not None:
            kept = kept[: max_size - 1]
        return cls("word", (UNK, *kept), lowercase, unk=UNK)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    @property
    def dtype(self) -> np.dtype[Any]:
        """The narrowest unsigned integer that holds every id: 1 byte per token when it can."""
        return np.dtype(np.uint8 if len(self) <= 2**8 else np.uint16 if len(self) <= 2**16 else np.uint32)

    def normalise(self, text: str) -> str:
        return text.lower() if self.lowercase else text

    def encode_tokens(self, tokens: Sequence[str]) -> np.ndarray:
        """Token ids; unknown tokens become `<unk>` where there is one, else raise naming them."""
        if self.unk is None:
            missing = sorted({t for t in tokens if t not in self._index})
            if missing:
                raise VocabularyError(
                    f"{len(missing)} token(s) not in the vocabulary of {len(self)}: "
                    + ", ".join(repr(t) for t in missing[:20])
                )
        unk_id = self._index.get(self.unk, -1) if self.unk else -1
        return np.fromiter((self._index.get(t, unk_id) for t in tokens), dtype=self.dtype, count=len(tokens))

    def encode(self, text: str) -> np.ndarray:
        text = self.normalise(text)
        if self.level == "char":
            return self._encode_chars(text)
        return self.encode_tokens(self.tokenize(text))

    def tokenize(self, text: str) -> list[str]:
        """`text` (already normalised) as this vocabulary's tokens."""
        return tokenize(text, self.level, self.spaced)

    def _encode_chars(self, text: str) -> np.ndarray:
        """Vectorised: code points looked up in the sorted character table (no Python loop). The
        ids are the stored order's, so a vocabulary saved in another order still encodes right."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        stored = np.frombuffer("".join(self.tokens).encode("utf-32-le"), dtype=np.uint32)
        order = np.argsort(stored, kind="stable")
        table = stored[order]
        found = np.searchsorted(table, points)
        bad = (found >= len(table)) | (table[np.minimum(found, len(table) - 1)] != points)
        ids = order[np.minimum(found, len(table) - 1)]
        if bad.any():
            missing = sorted({chr(p) for p in points[bad]})
            raise VocabularyError(
                f"{len(missing)} character(s) not in the vocabulary of {len(self)}: "
                + ", ".join(repr(c) for c in missing[:20])
            )
        return ids.astype(self.dtype)

    def decode(self, ids: Iterable[int]) -> str:
        return detokenize([self.tokens[int(i)] for i in ids], self.level, self.spaced)

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "lowercase": self.lowercase,
            "unk": self.unk,
            "spaced": self.spaced,
            "tokens": list(self.tokens),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        spaced = bool(data.get("spaced", data["level"] == "char"))  # word vocabularies before the key: legacy
        return cls(data["level"], tuple(data["tokens"]), bool(data["lowercase"]), data.get("unk"), spaced)

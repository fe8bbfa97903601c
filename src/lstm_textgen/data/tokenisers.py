"""Tokenisers: text <-> token ids, one class per level (character, word, byte, byte-level BPE) behind
one protocol, `Vocabulary`: encode, decode, tokenize, a streaming detokenizer (detokenisers.py),
characters per token. How text is cut into tokens below any vocabulary: tokens.py.

The vocabulary is saved as JSON together with its settings (level, lowercase, unknown token, and at
BPE level the Hugging Face tokenizer itself), so a trained model can be used later without the corpus.

Byte and BPE tokens are written in GPT-2's printable alphabet for bytes (a space is 'Ġ'), so byte
level is BPE without merges: both decode by joining the tokens' bytes, and both read any text (no
token is ever unknown). Bytes that do not form valid UTF-8 (a model can generate them) decode to
U+FFFD, so generated text is always valid UTF-8.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from lstm_textgen.data.detokenisers import ByteDetokenizer, Detokenizer, WordDetokenizer
from lstm_textgen.data.tokens import (
    BYTE_OF,
    BYTE_TOKENS,
    UNK,
    Level,
    VocabularyError,
    code_points,
    join_words,
    multibyte_characters,
    word_tokens,
)


@dataclass(frozen=True)
class Vocabulary:
    """The protocol every level speaks, and what they share: the tokens in id order, lowercasing,
    the JSON form (`to_dict` / `from_dict`, which picks the level's class). A level defines
    `tokenize`, `encode_normalised`, `decode`, `detokenizer` and `character_counts`."""

    level: ClassVar[Level]
    tokens: tuple[str, ...]
    lowercase: bool = False
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {token: i for i, token in enumerate(self.tokens)}
        if len(index) < len(self.tokens):
            twice = sorted({t for t in self.tokens if self.tokens.count(t) > 1})[:5]
            raise VocabularyError(f"the vocabulary lists {', '.join(map(repr, twice))} more than once")
        object.__setattr__(self, "_index", index)
        self.check()

    def check(self) -> None:
        """A level's own rule for its tokens (raise VocabularyError)."""

    @property
    def unknown(self) -> str | None:
        """The token that stands for tokens the vocabulary lacks (None: such a token is an error)."""
        return None

    # --- construction (each returns the level's class)
    @classmethod
    def words(
        cls, counts: dict[str, int], lowercase: bool, min_freq: int = 1, max_size: int | None = None
    ) -> WordVocabulary:
        return WordVocabulary.from_counts(counts, lowercase, min_freq, max_size)

    @classmethod
    def byte_level(cls, lowercase: bool) -> ByteVocabulary:
        return ByteVocabulary(BYTE_TOKENS, lowercase)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, lowercase: bool) -> BpeVocabulary:
        return BpeVocabulary.from_tokenizer(tokenizer, lowercase)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        """A saved vocabulary (vocab.json) as its level's class."""
        kind = LEVELS.get(data.get("level"))  # type: ignore[arg-type]
        if kind is None:
            raise VocabularyError(
                f"unknown vocabulary level {data.get('level')!r}; one of {', '.join(LEVELS)}"
            )
        return kind.from_saved(data)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(tuple(data["tokens"]), bool(data["lowercase"]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "lowercase": self.lowercase,
            "unk": None,
            "spaced": True,
            "tokens": list(self.tokens),
        }

    def with_tokens(self, tokens: tuple[str, ...]) -> Vocabulary:
        """The same vocabulary with other tokens (fine-tuning appends the new corpus's)."""
        return dataclasses.replace(self, tokens=tokens)

    # --- shared behaviour
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

    def encode(self, text: str) -> np.ndarray:
        """Text (not yet lowercased) -> ids; vectorised or in Rust wherever the level allows."""
        return self.encode_normalised(self.normalise(text))

    def encode_tokens(self, tokens: Sequence[str]) -> np.ndarray:
        """Token ids; unknown tokens become `unk` where the level has one, else raise naming them."""
        if self.unknown is None:
            missing = sorted({t for t in tokens if t not in self._index})
            if missing:
                raise VocabularyError(
                    f"{len(missing)} token(s) not in the vocabulary of {len(self)}: "
                    + ", ".join(repr(t) for t in missing[:20])
                )
        unk_id = self._index.get(self.unknown, -1) if self.unknown else -1
        return np.fromiter((self._index.get(t, unk_id) for t in tokens), dtype=self.dtype, count=len(tokens))

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """Several (normalised) pieces of one text, concatenated."""
        parts = [self.encode_normalised(t) for t in texts]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    # --- per level
    def tokenize(self, text: str) -> list[str]:
        """`text` (already normalised) as this vocabulary's tokens."""
        raise NotImplementedError

    def encode_normalised(self, text: str) -> np.ndarray:
        """`encode` of a text already lowercased where the vocabulary is."""
        return self.encode_tokens(self.tokenize(text))

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def detokenizer(self, previous: int | None = None) -> Detokenizer:
        """Text as it is generated, token by token; `previous` is the prompt's last token."""
        return Detokenizer(self)

    @cached_property
    def character_counts(self) -> np.ndarray:
        """Characters each token adds to the text."""
        return np.array([len(t) for t in self.tokens], dtype=np.int64)


@dataclass(frozen=True)
class CharVocabulary(Vocabulary):
    """One token per character, in code-point order (char-rnn's and nanoGPT's choice)."""

    level: ClassVar[Level] = "char"

    def check(self) -> None:
        if any(len(t) != 1 for t in self.tokens):
            raise VocabularyError("a char vocabulary holds single characters only")

    def tokenize(self, text: str) -> list[str]:
        return list(text)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[int(i)] for i in ids)

    def encode_normalised(self, text: str) -> np.ndarray:
        """Vectorised, on the UTF-8 bytes: one-byte characters through a 256-entry table, the few
        multi-byte ones decoded where they start, their other bytes then dropped. The ids are the
        stored order's, so a vocabulary saved in another order still encodes right."""
        table = self._char_table
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        present = np.flatnonzero(np.bincount(data, minlength=256)[:128])
        missing = [chr(b) for b in present if b >= len(table) or table[b] < 0]
        ids = self._ascii_ids[data]
        lead, points = multibyte_characters(data)
        if len(lead):
            found = table[np.minimum(points, len(table) - 1)]
            missing += sorted({chr(p) for p in points[found < 0]})
            ids[lead] = found.astype(self.dtype)
            ids = np.delete(ids, np.flatnonzero((data & 0xC0) == 0x80))
        if missing:
            missing = sorted(set(missing))
            raise VocabularyError(
                f"{len(missing)} character(s) not in the vocabulary of {len(self)}: "
                + ", ".join(repr(c) for c in missing[:20])
            )
        return ids

    @cached_property
    def _char_table(self) -> np.ndarray:
        """Code point -> id (-1: not in the vocabulary), one entry per code point up to the largest."""
        points = code_points("".join(self.tokens))
        table = np.full(int(points.max()) + 2 if len(points) else 1, -1, dtype=np.int32)
        table[points] = np.arange(len(points))
        return table

    @cached_property
    def _ascii_ids(self) -> np.ndarray:
        """Byte -> id for the one-byte characters (0 elsewhere: those bytes are fixed or dropped)."""
        table = self._char_table[:128]
        ids = np.zeros(256, dtype=self.dtype)
        ids[: len(table)] = np.maximum(table, 0)
        return ids


@dataclass(frozen=True)
class WordVocabulary(Vocabulary):
    """Words and punctuation marks with their leading space, line breaks, and `<unk>` for the rest."""

    level: ClassVar[Level] = "word"
    unk: str | None = UNK
    spaced: bool = True  # tokens carry their leading space (False: a vocabulary saved before they did)

    @classmethod
    def from_counts(
        cls, counts: dict[str, int], lowercase: bool, min_freq: int = 1, max_size: int | None = None
    ) -> WordVocabulary:
        """`<unk>` first, then the words seen at least `min_freq` times, most frequent first, at most
        `max_size` entries in all."""
        kept = sorted(
            (t for t, n in counts.items() if n >= min_freq and t != UNK), key=lambda t: (-counts[t], t)
        )
        if max_size is not None:
            kept = kept[: max_size - 1]
        return cls((UNK, *kept), lowercase)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> WordVocabulary:
        # vocabularies saved before the `spaced` key held bare tokens
        return cls(
            tuple(data["tokens"]), bool(data["lowercase"]), data.get("unk"), bool(data.get("spaced", False))
        )

    @property
    def unknown(self) -> str | None:
        return self.unk

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "unk": self.unk, "spaced": self.spaced}

    def tokenize(self, text: str) -> list[str]:
        return word_tokens(text, self.spaced)

    def decode(self, ids: Iterable[int]) -> str:
        return join_words([self.tokens[int(i)] for i in ids], self.spaced)

    def detokenizer(self, previous: int | None = None) -> Detokenizer:
        return WordDetokenizer(self, previous)


@dataclass(frozen=True)
class ByteVocabulary(Vocabulary):
    """The 256 UTF-8 byte values, in GPT-2's printable alphabet: every text encodes, nothing is unknown."""

    level: ClassVar[Level] = "byte"

    def check(self) -> None:
        if self.tokens != BYTE_TOKENS:
            raise VocabularyError("a byte vocabulary holds the 256 byte tokens in byte order")

    def tokenize(self, text: str) -> list[str]:
        return [BYTE_TOKENS[b] for b in text.encode("utf-8")]

    def encode_normalised(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int]) -> str:
        """Joined bytes; bytes that are not valid UTF-8 (a model can generate them) become U+FFFD."""
        return b"".join(self.token_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")

    def detokenizer(self, previous: int | None = None) -> Detokenizer:
        return ByteDetokenizer(self)

    @cached_property
    def token_bytes(self) -> tuple[bytes, ...]:
        """The UTF-8 bytes each token stands for."""
        return tuple(bytes(BYTE_OF[c] for c in token) for token in self.tokens)

    @cached_property
    def character_counts(self) -> np.ndarray:
        """A token's bytes that start a character (a character split over tokens counts once)."""
        return np.array([sum((b & 0xC0) != 0x80 for b in t) for t in self.token_bytes], dtype=np.int64)


@dataclass(frozen=True)
class BpeVocabulary(ByteVocabulary):
    """Byte level plus merges: a byte-level BPE trained on the training split (Hugging Face tokenizers,
    saved inside vocab.json as its JSON). Decoding is byte level's."""

    level: ClassVar[Level] = "bpe"
    tokenizer: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if not self.tokenizer:
            raise VocabularyError("a bpe vocabulary needs its tokenizer")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, lowercase: bool) -> BpeVocabulary:
        """A trained `tokenizers.Tokenizer`: its tokens in id order, and itself."""
        tokens = tuple(tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size()))
        return cls(tokens, lowercase, json.loads(tokenizer.to_str()))

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> BpeVocabulary:
        return cls(tuple(data["tokens"]), bool(data["lowercase"]), data.get("tokenizer") or {})

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "tokenizer": self.tokenizer}

    def tokenize(self, text: str) -> list[str]:
        return self._bpe.encode(text).tokens

    def encode_normalised(self, text: str) -> np.ndarray:
        return np.asarray(self._bpe.encode(text).ids, dtype=self.dtype)

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """In parallel, in Rust."""
        encodings = self._bpe.encode_batch_fast(texts)
        return np.fromiter((i for e in encodings for i in e.ids), dtype=self.dtype)

    @cached_property
    def _bpe(self) -> Any:
        from tokenizers import Tokenizer  # only BPE vocabularies need the library loaded

        return Tokenizer.from_str(json.dumps(self.tokenizer))


LEVELS: dict[str, type[Vocabulary]] = {
    "char": CharVocabulary,
    "word": WordVocabulary,
    "byte": ByteVocabulary,
    "bpe": BpeVocabulary,
}

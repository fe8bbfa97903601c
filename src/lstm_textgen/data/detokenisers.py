"""Generated tokens streamed as text, one token at a time: a word takes its spacing from the token
before it, a character's UTF-8 bytes are held back until its last one (an invalid sequence becomes
U+FFFD)."""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lstm_textgen.data.tokenisers import ByteVocabulary, Vocabulary


class Detokenizer:
    """Streams generated tokens as text, one token's text at a time (char level: its character)."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab

    def push(self, token: int) -> str:
        return self.vocab.decode([token])

    def finish(self) -> str:
        """What is still held back at the end."""
        return ""


class WordDetokenizer(Detokenizer):
    """A word token's spacing comes from the token before it."""

    def __init__(self, vocab: Vocabulary, previous: int | None) -> None:
        super().__init__(vocab)
        self.previous = previous

    def push(self, token: int) -> str:
        decode = self.vocab.decode
        text = (
            decode([token])
            if self.previous is None
            else decode([self.previous, token])[len(decode([self.previous])) :]
        )
        self.previous = token
        return text


class ByteDetokenizer(Detokenizer):
    """Bytes pass through an incremental UTF-8 decoder, so a character whose bytes arrive in two
    tokens is written once, whole, when its last byte arrives."""

    vocab: ByteVocabulary

    def __init__(self, vocab: ByteVocabulary) -> None:
        super().__init__(vocab)
        self.bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.bytes.decode(self.vocab.token_bytes[token])

    def finish(self) -> str:
        """An unfinished UTF-8 sequence, as U+FFFD."""
        return self.bytes.decode(b"", final=True)

"""Streaming preparation: corpus.txt -> vocabulary + train/val/test token arrays, in bounded memory
(the text read in pieces: pieces.py; the splits written as they come: split_writer.py).

The text is read in pieces of about `chunk_bytes`, each cut right after a line break that has
non-space characters on both sides, so no token of any level straddles two pieces (a word never
spans a line break; GPT-2's pre-tokeniser treats a run of whitespace as a whole, hence the spaces
around the cut) and lowercasing a piece equals lowercasing the whole. Memory follows the piece size
and the vocabulary, never the corpus size.

Each level reads the text twice:
- char: count the code points, then encode with a code point -> id table;
- byte: count the bytes, then copy them (the vocabulary is the 256 byte values);
- word: tokenise once, writing provisional ids (first-seen order) to a scratch file; count the
  training split's tokens from it; then map provisional ids to the final vocabulary's;
- bpe: count characters, train the tokenizer on the training split's text, then encode each split.
Char, byte and word splits are cut by tokens (train | val | test, contiguous); BPE splits are cut by
characters, since the tokenizer must be trained on the training text before there are tokens.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lstm_textgen.data.dataset import SPLITS_FILE, VOCAB_FILE, Dataset, load_dataset
from lstm_textgen.data.normalise import CHUNK_BYTES
from lstm_textgen.data.pieces import Pieces, sub_pieces, text_pieces
from lstm_textgen.data.split_writer import read_blocks, split_writer
from lstm_textgen.data.tokenisers import CharVocabulary, Vocabulary
from lstm_textgen.data.tokens import multibyte_characters, word_tokens
from lstm_textgen.data.windows import SPLITS, SplitSizes, split_sizes
from lstm_textgen.errors import UserError
from lstm_textgen.files import write_json
from lstm_textgen.params import DataParams

# BPE texts go to the Rust library in pieces of about this many characters: small enough that its
# per-sequence structures stay small, many enough to keep every core busy
BPE_PIECE = 1 << 14
# The BPE learns its merges from at most this many characters from the start of the training split
# (as sentencepiece's input_sentence_size does): merges settle long before, and a corpus of gigabytes
# would otherwise spend most of its preparation counting pairs
BPE_TRAIN_CHARACTERS = 100_000_000

# The levels


@dataclass(frozen=True)
class Prepared:
    vocab: Vocabulary
    splits: dict[str, dict[str, int]]  # per split: tokens, characters
    oov_rate: dict[str, float]
    distinct: int  # distinct tokens the text uses (a vocabulary of byte values lists all 256)


def prepare_chars(
    pieces: Pieces, data: DataParams, out_dir: Path, scratch: Path, base: Vocabulary | None = None
) -> Prepared:
    counts = np.zeros(0x110000, dtype=np.int64)
    for piece in pieces():  # one-byte characters by their bytes, the others decoded
        utf8 = np.frombuffer(piece.encode("utf-8"), dtype=np.uint8)
        counts[:128] += np.bincount(utf8, minlength=256)[:128]
        seen = np.bincount(multibyte_characters(utf8)[1])
        counts[: len(seen)] += seen
    used = np.flatnonzero(counts)
    vocab = extend(base, CharVocabulary(tuple(chr(c) for c in used), data.lowercase))
    sizes = split_sizes(int(counts.sum()), data.val_fraction, data.test_fraction)
    with split_writer(out_dir, sizes, vocab.dtype) as writer:
        for piece in pieces():
            writer.write(vocab.encode_normalised(piece))
    return Prepared(vocab, writer.split_summary(), dict.fromkeys(SPLITS, 0.0), len(used))


def prepare_bytes(
    pieces: Pieces, data: DataParams, out_dir: Path, scratch: Path, base: Vocabulary | None = None
) -> Prepared:
    counts = np.zeros(256, dtype=np.int64)
    for piece in pieces():
        counts += np.bincount(np.frombuffer(piece.encode("utf-8"), dtype=np.uint8), minlength=256)
    vocab = Vocabulary.byte_level(data.lowercase)
    sizes = split_sizes(int(counts.sum()), data.val_fraction, data.test_fraction)
    lengths = vocab.character_counts
    with split_writer(out_dir, sizes, vocab.dtype) as writer:
        for piece in pieces():
            ids = vocab.encode_normalised(piece)
            writer.write(ids, lengths[ids])
    distinct = int(np.count_nonzero(counts))
    return Prepared(vocab, writer.split_summary(), dict.fromkeys(SPLITS, 0.0), distinct)


def prepare_words(
    pieces: Pieces, data: DataParams, out_dir: Path, scratch: Path, base: Vocabulary | None = None
) -> Prepared:
    """Words are tokenised once; their provisional ids (first-seen order) wait in a scratch file
    until the training split's counts have made the vocabulary."""
    index: dict[str, int] = {}
    with (scratch / "words").open("wb") as out:
        for piece in pieces():
            out.write(provisional_ids(word_tokens(piece), index).tobytes())
    words_file, word_id = scratch / "words", np.dtype(np.uint32)
    sizes = split_sizes(words_file.stat().st_size // word_id.itemsize, data.val_fraction, data.test_fraction)
    counts = np.zeros(len(index), dtype=np.int64)
    for block in read_blocks(words_file, word_id, stop=sizes.train):
        counts += np.bincount(block, minlength=len(index))
    words = list(index)
    seen = dict(zip(words, counts.tolist(), strict=True))
    vocab = extend(base, Vocabulary.words(seen, data.lowercase, data.min_freq), data.max_vocab)
    to_final = vocab.encode_tokens(words)  # a word left out becomes <unk> (id 0)
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    with split_writer(out_dir, sizes, vocab.dtype, unk_id=0) as writer:
        for block in read_blocks(words_file, word_id):
            writer.write(to_final[block], lengths[block])
    oov = {n: writer.unknown[n] / max(1, getattr(sizes, n)) for n in SPLITS}
    return Prepared(vocab, writer.split_summary(), oov, len(vocab) - 1)


def extend(base: Vocabulary | None, new: Vocabulary, max_size: int | None = None) -> Vocabulary:
    """`new` itself, or with a source vocabulary (fine-tuning): the source's tokens keep their ids and
    the new corpus's other tokens follow, in `new`'s order, up to `max_size` in all."""
    if base is None:
        kept = new.tokens[:max_size] if max_size else new.tokens
        return new.with_tokens(kept)
    added = tuple(t for t in new.tokens if t not in base)
    if max_size is not None:
        added = added[: max(0, max_size - len(base))]
    return base.with_tokens(base.tokens + added)


def provisional_ids(tokens: list[str], index: dict[str, int]) -> np.ndarray:
    """Each token's id in `index`, new tokens added in first-seen order (a second pass only for the
    pieces that bring new words, which soon are few)."""
    get = index.get
    ids = [get(t) for t in tokens]
    if None in ids:
        ids = [index.setdefault(t, len(index)) if i is None else i for t, i in zip(tokens, ids, strict=True)]
    return np.array(ids, dtype=np.uint32)


def prepare_bpe(
    pieces: Pieces, data: DataParams, out_dir: Path, scratch: Path, base: Vocabulary | None = None
) -> Prepared:
    """Train a byte-level BPE on the training text (its first BPE_TRAIN_CHARACTERS; Rust, every
    core), then encode each split into a
    scratch file (its length is known only then) and copy the three into place."""
    total = sum(len(piece) for piece in pieces())
    chars = split_sizes(total, data.val_fraction, data.test_fraction)
    sample = SplitSizes(min(chars.train, BPE_TRAIN_CHARACTERS), 0, 0)
    train_texts = (
        small for text in _split_text(pieces, sample, "train") for small in sub_pieces(text, BPE_PIECE)
    )
    if base is not None:  # fine-tuning keeps the source's BPE: every text has its tokens already
        vocab = base
    else:
        vocab = Vocabulary.from_tokenizer(train_bpe(lambda: train_texts, data.vocab_size), data.lowercase)
    counted: dict[str, int] = {}
    for name in SPLITS:
        with (scratch / name).open("wb") as out:
            counted[name] = 0
            for text in _split_text(pieces, chars, name):
                ids = vocab.encode_batch(sub_pieces(text, BPE_PIECE))
                out.write(ids.tobytes())
                counted[name] += len(ids)
    with split_writer(out_dir, SplitSizes(**counted), vocab.dtype) as writer:
        for name in SPLITS:
            for block in read_blocks(scratch / name, vocab.dtype):
                writer.write(block)
    summary = {n: {"tokens": counted[n], "characters": getattr(chars, n)} for n in SPLITS}
    return Prepared(vocab, summary, dict.fromkeys(SPLITS, 0.0), len(vocab))


def _split_text(pieces: Pieces, chars: SplitSizes, name: str) -> Iterator[str]:
    """The text of split `name`, in pieces (the splits are cut by characters)."""
    begin = sum(getattr(chars, s) for s in SPLITS[: SPLITS.index(name)])
    end = begin + getattr(chars, name)
    position = 0
    for piece in pieces():
        lo, hi = max(begin, position), min(end, position + len(piece))
        if lo < hi:
            yield piece[lo - position : hi - position]
        position += len(piece)
        if position >= end:
            return


def train_bpe(texts: Callable[[], Iterator[str]], vocab_size: int) -> Any:
    """A GPT-2-style byte-level BPE: every byte is a token, so no text is ever unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts(), trainer)
    return tokenizer


PREPARERS: dict[str, Callable[..., Prepared]] = {
    "char": prepare_chars,
    "byte": prepare_bytes,
    "word": prepare_words,
    "bpe": prepare_bpe,
}


def prepare_corpus(
    corpus: Path,
    data: DataParams,
    out_dir: Path,
    *,
    corpus_info: dict[str, Any] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    base: Vocabulary | None = None,
) -> dict[str, Any]:
    """Write the vocabulary, the three splits and their sizes to `out_dir`; return the statistics.
    `base`: a fine-tuned model's vocabulary, whose tokens keep their ids (new ones are appended)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pieces = text_pieces(corpus, data.lowercase, chunk_bytes)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".prepare-") as scratch:
        prepared = PREPARERS[data.level](pieces, data, out_dir, Path(scratch), base)
    vocab = prepared.vocab
    if prepared.distinct < 2:
        named = (
            [repr(t) for t in vocab.tokens if t != vocab.unknown][:1]
            if data.level in ("char", "word")
            else []
        )
        raise UserError(
            f"the corpus has {prepared.distinct} distinct {data.level} token(s)"
            f"{' (' + named[0] + ')' if named else ''}: there is nothing to predict; use a corpus with at "
            "least two (data.corpus), or lower data.min_freq at word level"
        )
    write_json(out_dir / VOCAB_FILE, vocab.to_dict())
    write_json(out_dir / SPLITS_FILE, prepared.splits)
    stats: dict[str, Any] = {
        "level": data.level,
        "vocab_size": len(vocab),
        "bytes_per_token": vocab.dtype.itemsize,
        "characters": sum(s["characters"] for s in prepared.splits.values()),
        "tokens": {name: s["tokens"] for name, s in prepared.splits.items()},
        "characters_per_token": _ratio(prepared.splits),
        "oov_rate": prepared.oov_rate,
    }
    if base is not None:
        stats["added_tokens"] = len(vocab) - len(base)  # tokens the fine-tuned model had not seen
    if corpus_info:
        stats["corpus"] = {k: corpus_info[k] for k in ("name", "source", "text_sha256") if k in corpus_info}
    return stats


def _ratio(splits: dict[str, dict[str, int]]) -> float:
    tokens = sum(s["tokens"] for s in splits.values())
    return sum(s["characters"] for s in splits.values()) / max(1, tokens)


def build_dataset(text: str, data: DataParams, corpus_info: dict[str, Any] | None = None) -> Dataset:
    """In memory, for tests and benchmarks: the prepare stage's streaming path on `text`."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(text, encoding="utf-8", newline="")
        stats = prepare_corpus(corpus, data, Path(tmp) / "prepared", corpus_info=corpus_info)
        loaded = load_dataset(Path(tmp) / "prepared", mmap=False)
    return Dataset(loaded.vocab, loaded.splits, {**stats, **loaded.stats})

"""Streaming preparation: corpus.txt -> vocabulary + train/val/test token arrays, in bounded memory.

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

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lstm_textgen.data.dataset import SPLITS_FILE, VOCAB_FILE, Dataset, load_dataset
from lstm_textgen.data.normalise import file_chunks
from lstm_textgen.data.tokenisers import CharVocabulary, Vocabulary
from lstm_textgen.data.tokens import multibyte_characters, word_tokens
from lstm_textgen.data.windows import SPLITS, SplitSizes, split_sizes
from lstm_textgen.errors import UserError
from lstm_textgen.files import atomic_path, write_json
from lstm_textgen.params import DataParams

CHUNK_BYTES = 1 << 24
# A text with no safe cut in this many chunks (and at least MIN_FORCED_CUT characters) is cut anyway:
# one giant line must not hold the whole corpus in memory (a word there may then be split in two).
MAX_CARRY = 8
MIN_FORCED_CUT = 1 << 22
# BPE texts go to the Rust library in pieces of about this many characters: small enough that its
# per-sequence structures stay small, many enough to keep every core busy
BPE_PIECE = 1 << 14
# The BPE learns its merges from at most this many characters from the start of the training split
# (as sentencepiece's input_sentence_size does): merges settle long before, and a corpus of gigabytes
# would otherwise spend most of its preparation counting pairs
BPE_TRAIN_CHARACTERS = 100_000_000

Pieces = Callable[[], Iterator[str]]


# --------------------------------------------------------------------------------------------------
# Reading the text in pieces


def safe_cut(text: str) -> int:
    """The position after the last line break with non-space characters on both sides (0: none)."""
    at = text.rfind("\n", 0, len(text) - 1)
    while at > 0:
        if not text[at - 1].isspace() and not text[at + 1].isspace():
            return at + 1
        at = text.rfind("\n", 0, at)
    return 0


def safe_pieces(chunks: Iterator[str], chunk_chars: int) -> Iterator[str]:
    """`chunks` re-cut at safe places (see the module's docstring); each piece is copied once."""
    held: list[str] = []  # text since the last cut
    held_chars = 0
    for chunk in chunks:
        cut = safe_cut(chunk)  # safe in the whole text too (a cut at a chunk's seam is just missed)
        forced = held_chars + len(chunk) > max(MAX_CARRY * chunk_chars, MIN_FORCED_CUT)
        if cut or forced:
            cut = cut or len(chunk)
            yield "".join([*held, chunk[:cut]])
            held, held_chars = [chunk[cut:]], len(chunk) - cut
        else:
            held.append(chunk)
            held_chars += len(chunk)
    if held_chars:
        yield "".join(held)


def text_pieces(path: Path, lowercase: bool, chunk_bytes: int = CHUNK_BYTES) -> Pieces:
    """A re-iterable source of the corpus's (lowercased) text pieces."""

    def pieces() -> Iterator[str]:
        for piece in safe_pieces(file_chunks(path, chunk_bytes), chunk_bytes):
            yield piece.lower() if lowercase else piece

    return pieces


def sub_pieces(text: str, size: int) -> list[str]:
    """`text` cut at safe places into pieces of about `size` characters (for parallel encoding)."""
    out, start = [], 0
    while len(text) - start > size:
        cut = safe_cut(text[start : start + size])
        if not cut:
            break
        out.append(text[start : start + cut])
        start += cut
    return [*out, text[start:]]


# --------------------------------------------------------------------------------------------------
# Writing the splits


@dataclass
class SplitWriter:
    """Fills train.npy, val.npy and test.npy in order with the ids it is given, counting per split
    the characters they stand for and the unknown tokens among them. Written as plain appends after
    each file's .npy header (not through a memory map, whose written pages would count as the
    process's resident memory)."""

    sizes: SplitSizes
    files: dict[str, BinaryIO]
    dtype: np.dtype[Any]
    unk_id: int | None = None
    filled: int = 0
    characters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    unknown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))

    def write(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> None:
        """`lengths[i]`: characters of token i (None: one each)."""
        start, begin = 0, 0
        for name in SPLITS:
            end = begin + getattr(self.sizes, name)
            lo, hi = max(begin, self.filled), min(end, self.filled + len(ids) - start)
            begin = end
            if lo >= hi:
                continue
            part = ids[start : start + hi - lo]
            self.files[name].write(np.ascontiguousarray(part, dtype=self.dtype).tobytes())
            self.characters[name] += (
                int(lengths[start : start + hi - lo].sum()) if lengths is not None else len(part)
            )
            if self.unk_id is not None:
                self.unknown[name] += int(np.count_nonzero(part == self.unk_id))
            start += hi - lo
            self.filled = hi
        if start != len(ids):
            raise AssertionError(f"{len(ids) - start} ids beyond the counted total")

    def split_summary(self) -> dict[str, dict[str, int]]:
        return {n: {"tokens": getattr(self.sizes, n), "characters": self.characters[n]} for n in SPLITS}


@contextlib.contextmanager
def split_writer(
    out_dir: Path, sizes: SplitSizes, dtype: np.dtype[Any], unk_id: int | None = None
) -> Iterator[SplitWriter]:
    """The three .npy files, each renamed into `out_dir` when complete (and all ids are written)."""
    with contextlib.ExitStack() as stack:
        files = {}
        for name in SPLITS:
            tmp = stack.enter_context(atomic_path(out_dir / f"{name}.npy", suffix=".npy"))
            files[name] = stack.enter_context(tmp.open("wb"))
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
            np.lib.format.write_array_header_1_0(files[name], header | {"shape": (getattr(sizes, name),)})
        writer = SplitWriter(sizes, files, dtype, unk_id)
        yield writer
        if writer.filled != sizes.train + sizes.val + sizes.test:
            raise AssertionError(f"{writer.filled} ids written of {sizes}")


def read_blocks(
    path: Path, dtype: np.dtype[Any], stop: int | None = None, size: int = 1 << 22
) -> Iterator[np.ndarray]:
    """The ids of a raw scratch file (up to `stop`), a block at a time, read (not memory-mapped)."""
    with path.open("rb") as file:
        left = path.stat().st_size // dtype.itemsize if stop is None else stop
        while left > 0:
            block = np.fromfile(file, dtype=dtype, count=min(size, left))
            if not len(block):
                return
            left -= len(block)
            yield block


# --------------------------------------------------------------------------------------------------
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


LEVELS: dict[str, Callable[..., Prepared]] = {
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
        prepared = LEVELS[data.level](pieces, data, out_dir, Path(scratch), base)
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

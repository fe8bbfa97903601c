"""Tokenisers, vocabulary round trips, splits and windows."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_vocabulary, write_dataset

from lstm_textgen.data.dataset import load_dataset
from lstm_textgen.data.preparation import build_dataset
from lstm_textgen.data.tokenisers import Vocabulary, WordVocabulary
from lstm_textgen.data.tokens import UNK, VocabularyError, join_words, word_tokens
from lstm_textgen.errors import UserError
from lstm_textgen.params import DataParams

TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n"


def test_char_vocabulary_round_trip() -> None:
    vocab = build_vocabulary(TEXT, "char", lowercase=False)
    ids = vocab.encode(TEXT)
    assert ids.dtype == np.uint8
    assert vocab.decode(ids) == TEXT
    assert list(vocab.tokens) == sorted(set(TEXT))
    again = Vocabulary.from_dict(vocab.to_dict())
    assert again == vocab and np.array_equal(again.encode(TEXT), ids)


def test_unknown_character_is_named() -> None:
    vocab = build_vocabulary("abc", "char", lowercase=False)
    with pytest.raises(VocabularyError, match=r"2 character\(s\) not in the vocabulary of 3: 'x', 'z'"):
        vocab.encode("abzx")


def test_word_tokens_carry_their_space_and_join_back_into_the_text() -> None:
    text = "Don't stop, friend!\nNew line: 'Tis market-place, know--that \"it\" means 3.0."
    tokens = word_tokens(text)
    assert tokens[:9] == ["Don't", " stop", ",", " friend", "!", "\n", "New", " line", ":"]
    assert join_words(tokens) == text
    assert join_words(word_tokens("a  b \n c\t d")) == "a b\n c d"  # whitespace runs: one space


def test_word_vocabulary_min_freq_max_size_and_unk() -> None:
    tokens = word_tokens("a a a b b c")
    vocab = build_vocabulary(tokens, "word", lowercase=False, min_freq=2)
    assert vocab.tokens == (UNK, " a", " b")
    assert list(vocab.encode("x a c b")) == [0, 1, 0, 2]
    assert vocab.decode([1, 0, 2]) == " a <unk> b"
    assert build_vocabulary(tokens, "word", False, max_size=2).tokens == (UNK, " a")


def test_a_vocabulary_saved_before_tokens_carried_spaces_still_reads_and_writes_text() -> None:
    legacy = Vocabulary.from_dict(
        {"level": "word", "lowercase": False, "unk": UNK, "tokens": [UNK, "the", "cat", "."]}
    )
    assert not legacy.spaced
    assert list(legacy.encode("the cat.")) == [1, 2, 3]
    assert legacy.decode([1, 2, 3]) == "the cat."
    assert Vocabulary.from_dict(legacy.to_dict()) == legacy


def test_id_dtype_widens_with_vocabulary_size() -> None:
    assert WordVocabulary(tuple(str(i) for i in range(256))).dtype == np.uint8
    assert WordVocabulary(tuple(str(i) for i in range(257))).dtype == np.uint16
    assert WordVocabulary(tuple(str(i) for i in range(70_000))).dtype == np.uint32


def test_split_sizes_are_contiguous_and_the_seq_len_must_fit() -> None:
    from lstm_textgen.data.windows import check_fits, split_sizes

    sizes = split_sizes(1000, 0.1, 0.05)
    assert (sizes.train, sizes.val, sizes.test) == (850, 100, 50)
    check_fits(6, 5, "val")
    with pytest.raises(UserError, match=r"data\.seq_len: 20 is too long for the val split"):
        check_fits(20, 20, "val")


@pytest.mark.parametrize("level", ["char", "word"])
def test_dataset_save_load(tmp_path, level: str) -> None:
    text = TEXT * 50
    data = DataParams(level=level, lowercase=True, val_fraction=0.1, test_fraction=0.1)
    dataset = build_dataset(text, data, {"name": "t", "source": "s", "text_sha256": "h"})
    write_dataset(dataset, tmp_path)
    loaded = load_dataset(tmp_path)
    assert loaded.vocab == dataset.vocab
    for name in ("train", "val", "test"):
        assert isinstance(loaded.splits[name], np.memmap)
        assert np.array_equal(loaded.splits[name], dataset.splits[name])
    total = sum(dataset.stats["tokens"].values())
    assert total == (len(text) if level == "char" else len(word_tokens(text)))
    assert dataset.stats["corpus"]["name"] == "t"
    assert all(t == t.lower() for t in loaded.vocab.tokens if t != UNK)

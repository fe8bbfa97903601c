"""Scoring many texts at once: the short ones read side by side in one pass give each text the
figures it gets alone; long ones (several streams) go alone."""

from __future__ import annotations

import pytest
from conftest import CHAR_TEXT

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.errors import UserError
from lstm_textgen.inference.scoring import one_stream, score_text, score_texts
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.params import EvaluateParams

WINDOWS = EvaluateParams(seq_len=8, batch_size=4)


def test_texts_scored_together_equal_each_alone(char_model: RecurrentLM, char_vocab: Vocabulary) -> None:
    long = CHAR_TEXT * 2  # several streams: scored alone
    texts = ["he", "hello world", long[:17], long[:9], long, long[3:30], "a tiny text"]
    assert one_stream(len("hello world"), WINDOWS) and not one_stream(len(long), WINDOWS)
    together = score_texts(char_model, char_vocab, texts, windows=WINDOWS, per_token=True)
    for text, scored in zip(texts, together, strict=True):
        alone = score_text(char_model, char_vocab, text, windows=WINDOWS, per_token=True)
        assert (scored.tokens, scored.predicted, scored.characters) == (
            alone.tokens,
            alone.predicted,
            alone.characters,
        )
        assert scored.nats == pytest.approx(alone.nats, rel=1e-6)
        assert [t for t, _ in scored.token_logprobs] == [t for t, _ in alone.token_logprobs]
        for (_, mine), (_, theirs) in zip(scored.token_logprobs, alone.token_logprobs, strict=True):
            assert mine == pytest.approx(theirs, abs=1e-5)


def test_a_bad_text_among_many_is_named(char_model: RecurrentLM, char_vocab: Vocabulary) -> None:
    with pytest.raises(UserError, match="text has 1 token\\(s\\) not in the vocabulary: 'Z'"):
        score_texts(char_model, char_vocab, ["hello", "hello Z"], windows=WINDOWS)
    with pytest.raises(UserError, match="at least two tokens"):
        score_texts(char_model, char_vocab, ["hello", "h"], windows=WINDOWS)

"""Scoring many texts at once: the short ones read side by side in one pass give each text the
figures it gets alone; long ones (several streams) go alone."""

from __future__ import annotations

import pytest
import torch

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.errors import UserError
from lstm_textgen.inference.scoring import one_stream, score_text, score_texts
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.params import EvaluateParams, ModelParams

TEXT = "hello world, this is a tiny text.\nAnd another line of it, for scoring.\n"
WINDOWS = EvaluateParams(seq_len=8, batch_size=4)


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build(TEXT, "char", lowercase=False)


@pytest.fixture(scope="module", params=["lstm", "gru"])
def model(request, vocab: Vocabulary) -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(
        len(vocab), ModelParams(cell=request.param, layers=2, hidden=24, embedding_dim=8)
    ).eval()


def test_texts_scored_together_equal_each_alone(model: RecurrentLM, vocab: Vocabulary) -> None:
    texts = ["he", "hello world", TEXT[:17], TEXT[:9], TEXT, TEXT[3:30], "this is a tiny text."]
    assert one_stream(len("hello world"), WINDOWS) and not one_stream(len(TEXT), WINDOWS)
    together = score_texts(model, vocab, texts, WINDOWS, per_token=True)
    for text, scored in zip(texts, together, strict=True):
        alone = score_text(model, vocab, text, WINDOWS, per_token=True)
        assert (scored.tokens, scored.predicted, scored.characters) == (
            alone.tokens,
            alone.predicted,
            alone.characters,
        )
        assert scored.nats == pytest.approx(alone.nats, rel=1e-6)
        assert [t for t, _ in scored.token_logprobs] == [t for t, _ in alone.token_logprobs]
        for (_, mine), (_, theirs) in zip(scored.token_logprobs, alone.token_logprobs, strict=True):
            assert mine == pytest.approx(theirs, abs=1e-5)


def test_a_bad_text_among_many_is_named(model: RecurrentLM, vocab: Vocabulary) -> None:
    with pytest.raises(UserError, match="text has 1 token\\(s\\) not in the vocabulary: 'Z'"):
        score_texts(model, vocab, ["hello", "hello Z"], WINDOWS)
    with pytest.raises(UserError, match="at least two tokens"):
        score_texts(model, vocab, ["hello", "h"], WINDOWS)

"""Generation: strategies, seeds, top-k/top-p sets, stateful == re-feeding, prompt policies."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import build_vocabulary

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.data.tokens import word_tokens
from lstm_textgen.errors import UserError
from lstm_textgen.inference.drawing import draw, invert_cdf, plan_draws
from lstm_textgen.inference.generation import (
    PromptError,
    Sampling,
    encode_prompt,
    generate,
    sample_texts,
    stream_text,
)
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.model.stepper import Stepper
from lstm_textgen.params import ModelParams


def ids(vocab: Vocabulary, text: str) -> list[int]:
    return [int(i) for i in vocab.encode(text)]


def next_tokens(logits: torch.Tensor, sampling: Sampling, seed: int) -> torch.Tensor:
    """Every row of `logits` drawn with the same settings, each from its own stream."""
    randoms = [random.Random(seed + row) for row in range(logits.shape[0])]
    settings = [sampling] * logits.shape[0]
    return draw(logits, plan_draws(settings), settings, randoms)


def test_greedy_is_deterministic(char_model: RecurrentLM, char_vocab: Vocabulary) -> None:
    prompts = [ids(char_vocab, "hello"), ids(char_vocab, "tiny te")]
    first = generate(char_model, prompts, 30, Sampling(strategy="greedy"))
    assert first == generate(char_model, prompts, 30, Sampling(strategy="greedy"))
    assert [len(g) for g in first] == [30, 30]


def test_seed_repeats_and_differs(char_model: RecurrentLM, char_vocab: Vocabulary) -> None:
    prompts = [ids(char_vocab, "hello")] * 3
    settings = Sampling(strategy="sample", temperature=1.5, seed=7)
    first = generate(char_model, prompts, 40, settings)
    assert first == generate(char_model, prompts, 40, settings)
    assert first != generate(char_model, prompts, 40, Sampling(strategy="sample", temperature=1.5, seed=8))


def test_top_k_stays_in_the_k_most_likely() -> None:
    torch.manual_seed(1)
    logits = torch.randn(500, 30)
    allowed = torch.topk(logits, 4, dim=-1).indices
    for seed in range(5):
        picked = next_tokens(logits, Sampling(top_k=4, temperature=2.0), seed)
        assert (allowed == picked[:, None]).any(dim=1).all()


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).repeat(2000, 1)
    picked = next_tokens(probs.log(), Sampling(top_p=0.75), 0)
    assert set(picked.tolist()) == {0, 1}
    picked = next_tokens(probs.log(), Sampling(top_p=0.5), 0)
    assert set(picked.tolist()) == {0}
    picked = next_tokens(probs.log(), Sampling(top_p=1.0), 0)
    assert set(picked.tolist()) == {0, 1, 2, 3}


def test_mode_of_draws_picks_the_most_likely() -> None:
    probs = torch.tensor([[0.1, 0.55, 0.35]]).repeat(200, 1)
    picked = next_tokens(probs.log(), Sampling(strategy="mode", draws=400), 0)
    assert (picked == 1).all()


def test_stateful_generation_equals_refeeding(char_model: RecurrentLM, char_vocab: Vocabulary) -> None:
    prompt = ids(char_vocab, "this is")
    generated = generate(char_model, [prompt], 25, Sampling(strategy="greedy"))[0]
    sequence = prompt + generated
    # stateful: one step at a time from the warmed state, through the same `step` generation uses
    with torch.no_grad():
        logits, state = char_model(torch.tensor([prompt]), last_only=True)
        step = Stepper(char_model, state)
        for i, token in enumerate(generated):
            refed, _ = char_model(torch.tensor([sequence[: len(prompt) + i]]), last_only=True)
            torch.testing.assert_close(logits, refed, atol=1e-5, rtol=0)
            assert int(refed.argmax()) == token
            logits = step(torch.tensor([token]))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("encoding", ["embedding", "onehot", "scalar"])
@pytest.mark.parametrize("layers", [1, 3])  # one layer: the default model
def test_single_step_matches_the_sequence_kernel(cell: str, encoding: str, layers: int) -> None:
    torch.manual_seed(0)
    net = RecurrentLM(
        13, ModelParams(cell=cell, input=encoding, layers=layers, hidden=10, embedding_dim=5)
    ).eval()
    tokens = torch.randint(0, 13, (4, 9))
    with torch.no_grad():
        full, full_state = net(tokens[:, 1:], net(tokens[:, :1])[1])
        _, warmed = net(tokens[:, :1])
        step = Stepper(net, warmed)
        for t in range(1, tokens.shape[1]):
            logits = step(tokens[:, t])
            torch.testing.assert_close(logits, full[:, t - 1], atol=1e-5, rtol=0)
        state = step.state
    for mine, theirs in zip(
        state if isinstance(state, tuple) else (state,),
        full_state if isinstance(full_state, tuple) else (full_state,),
        strict=True,
    ):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_steps_record_no_graph_even_from_a_state_that_requires_grad() -> None:
    # the stepper has no torch.no_grad() of its own: its tensors must be detached from the start
    net = RecurrentLM(13, ModelParams(layers=2, hidden=10, embedding_dim=5))
    _, state = net(torch.randint(0, 13, (2, 5)))
    assert state[0].requires_grad
    step = Stepper(net, state)
    logits = step(torch.tensor([1, 2]))
    assert not logits.requires_grad and logits.grad_fn is None
    assert not any(t.requires_grad for t in step.state)


def test_batched_prompts_of_different_lengths_match_one_by_one(
    char_model: RecurrentLM, char_vocab: Vocabulary
) -> None:
    # prompts of equal length are warmed in one call: interleaved lengths must keep their rows
    prompts = [
        ids(char_vocab, "a"),
        ids(char_vocab, "hello world, th"),
        ids(char_vocab, "t"),
        ids(char_vocab, "this is a tiny "),
    ]
    together = generate(char_model, prompts, 20, Sampling(strategy="greedy"))
    alone = [generate(char_model, [p], 20, Sampling(strategy="greedy"))[0] for p in prompts]
    assert together == alone


def test_unknown_prompt_characters(char_vocab: Vocabulary) -> None:
    with pytest.raises(PromptError, match=r"2 token\(s\) not in the vocabulary: 'Q', 'Z'.*sample\.unknown"):
        encode_prompt("hello QZ", char_vocab)
    assert encode_prompt("heQllo", char_vocab, "skip") == ids(char_vocab, "hello")
    assert encode_prompt("heQllo", char_vocab, "replace", " ") == ids(char_vocab, "he llo")
    with pytest.raises(PromptError, match="replacement 'Q' is not in the vocabulary"):
        encode_prompt("heQ", char_vocab, "replace", "Q")
    with pytest.raises(PromptError, match="empty"):
        encode_prompt("QQ", char_vocab, "skip")
    with pytest.raises(PromptError, match="must be a string"):
        encode_prompt(123, char_vocab)  # type: ignore[arg-type]


def test_word_level_generation_reads_as_text() -> None:
    words = build_vocabulary(word_tokens("the cat sat on the mat .\n" * 5), "word", lowercase=True)
    torch.manual_seed(0)
    net = RecurrentLM(len(words), ModelParams(layers=1, hidden=16, embedding_dim=8)).eval()
    assert encode_prompt("The dog", words, "replace") == [words.tokens.index("the"), 0]
    with pytest.raises(PromptError, match="' dog'"):
        encode_prompt("the dog", words)
    (text,) = sample_texts(net, words, ["the cat"], length=12, sampling=Sampling(strategy="greedy"))
    assert text.startswith(" ") or text.startswith(".") or text.startswith("\n")
    assert "  " not in text


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"temperature": 0.0}, "temperature must be between 0.001 and 100"),
        ({"temperature": 1e-30}, "temperature must be between 0.001 and 100, got 1e-30"),  # inf in float32
        ({"temperature": float("inf")}, "temperature must be between"),
        ({"temperature": float("nan")}, "temperature must be between"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_p": float("nan")}, "top_p must be in"),
        ({"draws": 0}, "draws must be between 1 and 1000"),
        ({"draws": 10**9}, "draws must be between 1 and 1000, got 1000000000"),
        ({"seed": 2**64}, r"seed must be between 0 and 9223372036854775807"),
        ({"seed": -1}, r"seed must be between 0"),
        ({"strategy": "beam"}, "strategy: Input should be 'greedy', 'sample' or 'mode'"),
    ],
)
def test_bad_sampling_settings_are_refused_naming_the_field_and_its_limit(bad: dict, named: str) -> None:
    with pytest.raises(UserError, match=named):
        Sampling.checked(**bad)


def test_top_k_is_bounded_by_the_vocabulary_and_text_must_be_unicode(char_vocab: Vocabulary) -> None:
    Sampling(top_k=len(char_vocab)).check_vocabulary(len(char_vocab))
    with pytest.raises(
        UserError, match=r"top_k must be at most the vocabulary size \(\d+ tokens\), got 99,9"
    ):
        Sampling(top_k=99_999).check_vocabulary(len(char_vocab))
    for vocab in (char_vocab, Vocabulary.byte_level(lowercase=False)):
        with pytest.raises(PromptError, match=r"U\+D83D at character 2, half of a surrogate pair"):
            encode_prompt("ab\ud83d", vocab)


def test_inverse_cdf_draws_follow_the_distribution_and_skip_zero_probabilities() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20_000, 1)
    picked = next_tokens(probs.log(), Sampling(temperature=1.0), 0)
    counts = torch.bincount(picked, minlength=6).double() / len(picked)
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts, probs[0].double(), atol=0.015, rtol=0)
    # the ends of [0, 1) must still land on tokens that can occur
    edge = torch.tensor([[0.0, 0.25, 0.75, 0.0]]).repeat(2, 1)
    ends = torch.tensor([[0.0], [1.0 - 2**-24]])
    assert invert_cdf(edge, ends)[:, 0].tolist() == [1, 2]
    same = next_tokens(probs[:50].log(), Sampling(temperature=1.0), 7)
    assert torch.equal(same, next_tokens(probs[:50].log(), Sampling(temperature=1.0), 7))


def test_streamed_pieces_join_to_the_batch_text(char_model: RecurrentLM, char_vocab: Vocabulary) -> None:
    settings = Sampling(strategy="sample", temperature=1.2, seed=5)
    pieces = list(stream_text(char_model, char_vocab, ids(char_vocab, "hello"), 30, settings))
    assert len(pieces) == 30  # one character per step at char level, each as soon as it is drawn
    assert "".join(pieces) == sample_texts(char_model, char_vocab, ["hello"], length=30, sampling=settings)[0]


def test_streamed_bytes_come_out_as_whole_characters() -> None:
    vocab = Vocabulary.byte_level(lowercase=False)
    torch.manual_seed(0)
    byte_model = RecurrentLM(len(vocab), ModelParams(layers=1, hidden=16, embedding_dim=8)).eval()
    settings = Sampling(strategy="sample", temperature=3.0, seed=1)  # hot: many invalid sequences
    pieces = list(stream_text(byte_model, vocab, ids(vocab, "é"), 200, settings))
    assert "".join(pieces) == sample_texts(byte_model, vocab, ["é"], length=200, sampling=settings)[0]
    # a character's bytes are held back until its last one, then written whole; a sequence that
    # breaks off becomes one U+FFFD, and so does an unfinished one at the end
    stream = vocab.detokenizer()
    assert [stream.push(b) for b in "é☕!".encode()] + [stream.finish()] == ["", "é", "", "", "☕", "!", ""]
    broken = vocab.detokenizer()
    assert [broken.push(b) for b in b"\xe2\x98!\xc3"] + [broken.finish()] == ["", "", "\ufffd!", "", "\ufffd"]

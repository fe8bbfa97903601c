"""`POST /v1/score`'s request: texts to score with this project's scoring (bits per character and per
token, perplexity, each token's surprisal on `per_token`), checked within the served model's limits."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.serving.completions import RequestError, validated
from lstm_textgen.serving.limits import MAX_ROWS, MAX_SCORE_TOKENS_PER_REQUEST, prompt_problem


class ScoreRequest(BaseModel):
    """`input`: a text or a list of texts, one score each."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: str | list[str]
    per_token: bool = False

    @classmethod
    def parse(cls, body: Any) -> ScoreRequest:
        request = validated(cls, body)
        if not 1 <= len(request.texts) <= MAX_ROWS:
            raise RequestError(f"input must be a text or a list of 1 to {MAX_ROWS} texts", "input")
        for text in request.texts:
            if problem := prompt_problem(text, "input"):
                raise RequestError(problem, "input")
        return request

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def check_tokens(self, vocab: Vocabulary) -> None:
        """The request's size in the model's tokens, within what one request may score."""
        tokens = sum(len(vocab.tokenize(vocab.normalise(text))) for text in self.texts)
        if tokens > MAX_SCORE_TOKENS_PER_REQUEST:
            raise RequestError(
                f"a request may score at most {MAX_SCORE_TOKENS_PER_REQUEST:,} tokens in all, got {tokens:,}",
                "input",
            )

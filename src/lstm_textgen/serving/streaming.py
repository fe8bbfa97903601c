"""How drawn tokens reach a request's event loop: rows that report each token (or only their end)
from the batcher's thread through `loop.call_soon_threadsafe`, and one request's `Generation` that
turns them into text, cut at stop strings, with log-probabilities and latency metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from lstm_textgen.inference.generation import continuation
from lstm_textgen.inference.rows import Row, TokenLogprob
from lstm_textgen.model.checkpoint import LoadedModel
from lstm_textgen.serving.completions import Choice, CompletionRequest, LogprobTrack, StopScanner
from lstm_textgen.serving.metrics import ServerMetrics

_END = object()


def sse(data: Any) -> bytes:
    """One server-sent event: a JSON object, or a bare string such as `[DONE]`."""
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()


class AsyncRow(Row):
    """A row whose end, and each token if `each_token`, go as `(position, item)` onto its request's
    asyncio queue. A plain request without stop strings or logprobs needs only the end: its tokens
    are read once then, sparing the event loop a wake-up per token."""

    def __init__(
        self,
        *args: Any,
        loop: asyncio.AbstractEventLoop,
        sink: asyncio.Queue,
        position: int,
        each_token: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loop, self.sink, self.position, self.each_token = loop, sink, position, each_token

    def _send(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            self.loop.call_soon_threadsafe(self.sink.put_nowait, (self.position, item))

    def emit(self, token: int, logprob: TokenLogprob | None = None) -> None:
        super().emit(token, logprob)
        if self.each_token:
            self._send(token)

    def finish(self, error: BaseException | None = None) -> None:
        super().finish(error)
        self._send(_END)


@dataclass
class Update:
    """New text for one choice (and its tokens' log-probabilities), or its end."""

    position: int
    text: str
    logprobs: dict[str, list[Any]] | None = None
    finish_reason: str | None = None


class Generation:
    """One request's choices as their rows draw tokens: detokenised, cut at stop strings, timed."""

    def __init__(
        self,
        choices: list[Choice],
        rows: list[AsyncRow],
        request: CompletionRequest,
        loaded: LoadedModel,
        metrics: ServerMetrics,
        started: float,
    ) -> None:
        self.choices, self.rows, self.metrics, self.started = choices, rows, metrics, started
        self.stops = request.stops
        self.vocab = vocab = loaded.vocab
        self.text = [vocab.detokenizer(c.prompt_ids[-1]) for c in choices]
        self.scanners = [StopScanner(self.stops) for _ in choices]
        wants_logprobs = request.logprobs is not None
        self.tracks = [LogprobTrack(vocab) if wants_logprobs else None for _ in choices]
        self.produced = [0] * len(choices)  # characters drawn so far, stop strings included
        self.last_token: list[float | None] = [None] * len(choices)
        self.ended = [False] * len(choices)
        self.sink = rows[0].sink if rows else asyncio.Queue()

    async def updates(self) -> AsyncIterator[Update]:
        while not all(self.ended):
            position, item = await self.sink.get()
            if self.ended[position]:
                continue  # a row cut by a stop string, leaving at the next step
            if item is _END:
                yield self._end(position)
            else:
                update = self._token(position, int(item))  # type: ignore[call-overload]
                if update is not None:
                    yield update

    def _token(self, position: int, token: int) -> Update | None:
        now, row, choice = time.monotonic(), self.rows[position], self.choices[position]
        last = self.last_token[position]
        if last is None:
            self.metrics.time_to_first_token.observe(now - self.started)
        else:
            self.metrics.inter_token_latency.observe(now - last)
        self.last_token[position] = now
        self.metrics.generated_tokens.inc()
        choice.tokens += 1
        piece = self.text[position].push(token)
        track, logprobs = self.tracks[position], None
        if track is not None:  # this token's: the row may have drawn more since it was sent
            logprobs = track.add(token, row.token_logprobs[choice.tokens - 1], self.produced[position])
        self.produced[position] += len(piece)
        scanner = self.scanners[position]
        text = scanner.push(piece)
        choice.text += text
        if scanner.stopped:
            row.cancel()
            return self._finish(position, text, "stop")
        return Update(position, text, logprobs) if text or logprobs else None

    def _end(self, position: int) -> Update:
        row = self.rows[position]
        if row.error is not None:
            raise row.error
        if not row.each_token:  # the whole text at once, as the MLflow server makes it
            choice = self.choices[position]
            choice.tokens = len(row.tokens)
            self.metrics.generated_tokens.inc(len(row.tokens))
            choice.text = continuation(self.vocab, choice.prompt_ids, row.tokens)
            return self._finish(position, choice.text, "length")
        scanner = self.scanners[position]
        text = scanner.push(self.text[position].finish())
        text += scanner.finish()
        self.choices[position].text += text
        return self._finish(position, text, "stop" if scanner.stopped else "length")

    def _finish(self, position: int, text: str, reason: str) -> Update:
        self.ended[position] = True
        choice = self.choices[position]
        choice.finish_reason = reason
        track = self.tracks[position]
        if track is not None:
            choice.logprobs = track.upto(len(choice.text))
        return Update(position, text, None, reason)

    def cancel(self) -> None:
        for row in self.rows:
            row.cancel()

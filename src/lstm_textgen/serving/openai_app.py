"""`lstm-textgen serve`: an OpenAI-compatible HTTP API on the model's one batcher, streaming.

`POST /v1/completions` (plain, or `stream: true` as server-sent events ending in `data: [DONE]`),
`POST /v1/score` (this project's scoring), `GET /v1/models`, `GET /health`, `GET /metrics`.
Requests go straight into the `RowBatcher` that `mlflow models serve` also uses, with the same limits
(`limits.py`), but with no pandas frame or schema pass per request: each drawn token reaches its
request's event loop through `loop.call_soon_threadsafe`, and a client that goes away frees its rows
at the next step. Errors come in OpenAI's shape (`completions.error_body`), 503 with `Retry-After`
when every place is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from lstm_textgen.errors import UserError
from lstm_textgen.inference.batcher import RowBatcher
from lstm_textgen.inference.generation import continuation
from lstm_textgen.inference.rows import Cancelled, Job, Overloaded, Row, TokenLogprob
from lstm_textgen.inference.scoring import score_row, score_texts
from lstm_textgen.model.checkpoint import LoadedModel
from lstm_textgen.params import ParamsError
from lstm_textgen.serving.completions import (
    Choice,
    CompletionRequest,
    LogprobTrack,
    RequestError,
    StopScanner,
    chunk,
    completion,
    completion_id,
    error_body,
    plan_choices,
    prompt_tokens,
    usage,
)
from lstm_textgen.serving.limits import MAX_ROWS, MAX_SCORE_TOKENS_PER_REQUEST, ServingOptions, prompt_problem
from lstm_textgen.serving.metrics import ServerMetrics

RETRY_AFTER_SECONDS = "1"
_END = object()


@dataclass(frozen=True)
class ModelCard:
    """What `GET /v1/models` says of the loaded model; `id` is the name requests give as `model`."""

    id: str
    source: str
    version: str | None
    corpus: str
    level: str
    created: int

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "lstm-textgen",
            "root": self.source,
            "version": self.version,
            "corpus": self.corpus,
            "level": self.level,
        }


class ApiError(Exception):
    """An HTTP answer other than 200, in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if self.status == 503 else None
        body = error_body(str(self), self.kind, self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=headers)


def overloaded(exc: Overloaded) -> ApiError:
    return ApiError(503, str(exc), "server_overloaded", code="overloaded")


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


def authorised(request: Request, api_keys: frozenset[str]) -> None:
    if not api_keys:
        return
    given = request.headers.get("authorization", "")
    scheme, _, key = given.partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(key, k) for k in api_keys):
        raise ApiError(
            401,
            "a valid API key is required: send `Authorization: Bearer KEY`",
            "invalid_request_error",
            code="invalid_api_key",
        )


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body must be a JSON object", "invalid_request_error") from None


async def watch_disconnect(request: Request, generation: Generation) -> None:
    """A plain request's client that goes away frees its rows at the next step."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel()
            return


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()


def create_app(
    loaded: LoadedModel,
    card: ModelCard,
    options: ServingOptions | None = None,
    api_keys: Iterable[str] = (),
) -> FastAPI:
    """The API around one loaded model; its batcher starts and stops with the app."""
    options = options or ServingOptions()
    keys = frozenset(api_keys)
    batcher = RowBatcher(loaded.model, options.limits)
    metrics = ServerMetrics(
        running=lambda: len(batcher.rows),
        waiting=lambda: len(batcher.waiting),
        active_rows=options.limits.active_rows,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(
        title="lstm-textgen", summary="OpenAI-compatible completions of a recurrent LM", lifespan=lifespan
    )
    app.state.batcher, app.state.metrics, app.state.card = batcher, metrics, card

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        reason = {400: "invalid", 401: "unauthorized", 404: "invalid", 503: "overloaded", 504: "timeout"}
        metrics.rejected.labels(reason.get(exc.status, "invalid")).inc()
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    def check_model(name: Any) -> None:
        if name not in (card.id, card.source):
            raise ApiError(
                404,
                f"model {name!r} is not served here: this server serves {card.id!r} (GET /v1/models)",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )

    @app.post(
        "/v1/completions",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": CompletionRequest.model_json_schema()}},
            }
        },
    )
    async def completions(request: Request) -> Response:
        started = time.monotonic()
        authorised(request, keys)
        try:
            parsed = CompletionRequest.parse(await json_body(request))
            check_model(parsed.model)
            choices = plan_choices(parsed, loaded.vocab, loaded.params.sample)
            parsed.stops  # noqa: B018  (checked before any row starts)
        except RequestError as exc:
            raise ApiError(400, str(exc), "invalid_request_error", param=exc.param) from None
        generation = start(parsed, choices, started)
        if parsed.stream:
            return StreamingResponse(
                stream(parsed, generation, started),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(watch_disconnect(request, generation))
        try:
            async for _ in generation.updates():
                pass
        except UserError as exc:
            raise row_error(exc) from None
        finally:
            watcher.cancel()
            generation.cancel()
        if parsed.echo:
            for choice in choices:
                choice.text = choice.prompt + choice.text
        metrics.request_latency.observe(time.monotonic() - started)
        metrics.requests.labels("/v1/completions", "200").inc()
        return JSONResponse(completion(completion_id(), card.id, choices))

    def start(parsed: CompletionRequest, choices: list[Choice], started: float) -> Generation:
        loop, sink = asyncio.get_running_loop(), asyncio.Queue()
        deadline = started + options.request_seconds
        each_token = parsed.stream or bool(parsed.stops) or parsed.logprobs is not None
        rows = [
            AsyncRow(
                c.prompt_ids,
                c.max_tokens,
                c.sampling,
                deadline=deadline,
                logprobs=parsed.logprobs,
                loop=loop,
                sink=sink,
                position=i,
                each_token=each_token,
            )
            for i, c in enumerate(choices)
        ]
        try:
            batcher.submit(rows)
        except Overloaded as exc:
            raise overloaded(exc) from None
        except ParamsError as exc:  # what depends on the model: top_k beyond its vocabulary
            raise ApiError(400, str(exc), "invalid_request_error", param="top_k") from None
        metrics.prompt_tokens.inc(prompt_tokens(choices))
        return Generation(choices, rows, parsed, loaded, metrics, started)

    async def stream(
        parsed: CompletionRequest, generation: Generation, started: float
    ) -> AsyncIterator[bytes]:
        ident, created = completion_id(), int(time.time())
        choices = generation.choices
        try:
            if parsed.echo:
                echoed = [
                    {"index": c.index, "text": c.prompt, "logprobs": None, "finish_reason": None}
                    for c in choices
                ]
                yield sse(chunk(ident, card.id, created, echoed))
            async for update in generation.updates():
                index = choices[update.position].index
                piece = {
                    "index": index,
                    "text": update.text,
                    "logprobs": update.logprobs,
                    "finish_reason": update.finish_reason,
                }
                yield sse(chunk(ident, card.id, created, [piece]))
            if (parsed.stream_options or {}).get("include_usage"):
                prompt_tokens = sum(len(c.prompt_ids) for c in choices if c.copy == 0)
                yield sse(
                    chunk(ident, card.id, created, [], usage(prompt_tokens, sum(c.tokens for c in choices)))
                )
            metrics.requests.labels("/v1/completions", "200").inc()
        except UserError as exc:  # the answer has begun: the error goes as the last event
            failed = row_error(exc)
            metrics.rejected.labels("timeout" if failed.status == 504 else "invalid").inc()
            yield sse(error_body(str(failed), failed.kind, failed.param, failed.code))
        finally:
            generation.cancel()
            metrics.request_latency.observe(time.monotonic() - started)
        yield sse("[DONE]")

    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        """This project's scoring (as `lstm-textgen score` and the served model's task=score): bits
        per character and per token, perplexity; `per_token: true` adds each token's surprisal."""
        authorised(request, keys)
        body = await json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", "invalid_request_error")
        check_model(body.get("model"))
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_ROWS:
            raise ApiError(
                400,
                f"input must be a text or a list of 1 to {MAX_ROWS} texts",
                "invalid_request_error",
                "input",
            )
        for text in texts:
            if problem := prompt_problem(text, "input"):
                raise ApiError(400, problem, "invalid_request_error", "input")
        per_token = body.get("per_token", False)
        if not isinstance(per_token, bool):
            raise ApiError(400, "per_token must be true or false", "invalid_request_error", "per_token")
        vocab, sample = loaded.vocab, loaded.params.sample
        tokens = sum(len(vocab.tokenize(vocab.normalise(t))) for t in texts)
        if tokens > MAX_SCORE_TOKENS_PER_REQUEST:
            raise ApiError(
                400,
                f"a request may score at most {MAX_SCORE_TOKENS_PER_REQUEST:,} tokens in all, got {tokens:,}",
                "invalid_request_error",
                "input",
            )

        def work() -> list[Any]:
            return score_texts(
                loaded.model,
                vocab,
                texts,
                windows=loaded.params.evaluate,
                unknown=sample.unknown,
                replacement=sample.replacement,
                per_token=per_token,
            )

        job = Job(work, rows=len(texts), deadline=time.monotonic() + options.request_seconds)
        try:
            batcher.submit_job(job)
        except Overloaded as exc:
            raise overloaded(exc) from None
        try:
            scores = await asyncio.to_thread(job.result)
        except UserError as exc:
            raise row_error(exc) from None
        metrics.requests.labels("/v1/score", "200").inc()
        return JSONResponse({"object": "list", "model": card.id, "data": [score_row(s) for s in scores]})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorised(request, keys)
        return JSONResponse({"object": "list", "data": [card.as_openai()]})

    @app.get("/health")
    async def health() -> JSONResponse:
        if batcher.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "the model cannot step"}, status_code=503)

    @app.get("/metrics")
    async def metrics_page() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def row_error(exc: UserError) -> ApiError:
    """A row that failed once generating: its time limit passed (504), or its own draw failed (400)."""
    if isinstance(exc, Cancelled):
        return ApiError(504, f"{exc}: ask for fewer tokens, or retry", "timeout", code="timeout")
    return ApiError(400, str(exc), "invalid_request_error")

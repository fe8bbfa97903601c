"""`lstm-textgen serve`: an OpenAI-compatible HTTP API on the model's one batcher, streaming.

`POST /v1/completions` (plain, or `stream: true` as server-sent events ending in `data: [DONE]`),
`POST /v1/score` (this project's scoring), `GET /v1/models`, `GET /health`, `GET /metrics`.
Requests go straight into the `RowBatcher` that `mlflow models serve` also uses, with the same limits
(`limits.py`), but with no pandas frame or schema pass per request: each drawn token reaches its
request's event loop (`streaming.py`), and a client that goes away frees its rows at the next step.
Errors come in OpenAI's shape (`api_errors.py`), 503 with `Retry-After` when every place is taken.
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
from lstm_textgen.inference.rows import Job, Overloaded
from lstm_textgen.inference.scoring import score_row, score_texts
from lstm_textgen.model.checkpoint import LoadedModel
from lstm_textgen.params import ParamsError
from lstm_textgen.serving.api_errors import ApiError, error_responses, invalid, overloaded, row_error
from lstm_textgen.serving.completions import (
    Choice,
    CompletionRequest,
    RequestError,
    chunk,
    completion,
    completion_id,
    error_body,
    plan_choices,
    prompt_tokens,
    usage,
)
from lstm_textgen.serving.drain import install_drain
from lstm_textgen.serving.limits import ServingOptions
from lstm_textgen.serving.metrics import ServerMetrics
from lstm_textgen.serving.score_request import ScoreRequest
from lstm_textgen.serving.streaming import AsyncRow, Generation, sse


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
        raise invalid("the body must be a JSON object") from None


async def watch_disconnect(request: Request, generation: Generation) -> None:
    """A plain request's client that goes away frees its rows at the next step."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.cancel()
            return


@dataclass
class CompletionsApi:
    """The endpoints' work around one loaded model and its batcher; `create_app` routes to it."""

    loaded: LoadedModel
    card: ModelCard
    options: ServingOptions
    keys: frozenset[str]
    batcher: RowBatcher
    metrics: ServerMetrics

    def check_model(self, name: str) -> None:
        if name not in (self.card.id, self.card.source):
            raise ApiError(
                404,
                f"model {name!r} is not served here: this server serves {self.card.id!r} (GET /v1/models)",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )

    async def completions(self, request: Request) -> Response:
        started = time.monotonic()
        authorised(request, self.keys)
        try:
            parsed = CompletionRequest.parse(await json_body(request))
            self.check_model(parsed.model)
            choices = plan_choices(parsed, self.loaded.vocab, self.loaded.params.sample)
        except RequestError as exc:
            raise invalid(str(exc), exc.param) from None
        generation = self.start(parsed, choices, started)
        if parsed.stream:
            return StreamingResponse(
                self.stream(parsed, generation, started),
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
        self.metrics.request_latency.observe(time.monotonic() - started)
        self.metrics.requests.labels("/v1/completions", "200").inc()
        return JSONResponse(completion(completion_id(), self.card.id, choices))

    def start(self, parsed: CompletionRequest, choices: list[Choice], started: float) -> Generation:
        """The request's rows into the batcher: one per choice, reporting to this event loop."""
        loop, sink = asyncio.get_running_loop(), asyncio.Queue()
        deadline = started + self.options.request_seconds
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
            self.batcher.submit(rows)
        except Overloaded as exc:
            raise overloaded(exc) from None
        except ParamsError as exc:  # what depends on the model: top_k beyond its vocabulary
            raise invalid(str(exc), exc.field) from None
        self.metrics.prompt_tokens.inc(prompt_tokens(choices))
        return Generation(choices, rows, parsed, self.loaded, self.metrics, started)

    async def stream(
        self, parsed: CompletionRequest, generation: Generation, started: float
    ) -> AsyncIterator[bytes]:
        ident, created, model = completion_id(), int(time.time()), self.card.id
        choices = generation.choices
        try:
            if parsed.echo:
                echoed = [
                    {"index": c.index, "text": c.prompt, "logprobs": None, "finish_reason": None}
                    for c in choices
                ]
                yield sse(chunk(ident, model, created, echoed))
            async for update in generation.updates():
                piece = {
                    "index": choices[update.position].index,
                    "text": update.text,
                    "logprobs": update.logprobs,
                    "finish_reason": update.finish_reason,
                }
                yield sse(chunk(ident, model, created, [piece]))
            if (parsed.stream_options or {}).get("include_usage"):
                counted = usage(prompt_tokens(choices), sum(c.tokens for c in choices))
                yield sse(chunk(ident, model, created, [], counted))
            self.metrics.requests.labels("/v1/completions", "200").inc()
        except UserError as exc:  # the answer has begun: the error goes as the last event
            failed = row_error(exc)
            self.metrics.rejected.labels(failed.reason).inc()
            yield sse(error_body(str(failed), failed.kind, failed.param, failed.code))
        finally:
            generation.cancel()
            self.metrics.request_latency.observe(time.monotonic() - started)
        yield sse("[DONE]")

    async def score(self, request: Request) -> JSONResponse:
        authorised(request, self.keys)
        loaded = self.loaded
        try:
            parsed = ScoreRequest.parse(await json_body(request))
            self.check_model(parsed.model)
            parsed.check_tokens(loaded.vocab)
        except RequestError as exc:
            raise invalid(str(exc), exc.param) from None
        sample = loaded.params.sample

        def work() -> list[Any]:
            return score_texts(
                loaded.model,
                loaded.vocab,
                parsed.texts,
                windows=loaded.params.evaluate,
                unknown=sample.unknown,
                replacement=sample.replacement,
                per_token=parsed.per_token,
            )

        job = Job(work, rows=len(parsed.texts), deadline=time.monotonic() + self.options.request_seconds)
        try:
            self.batcher.submit_job(job)
        except Overloaded as exc:
            raise overloaded(exc) from None
        try:
            scores = await asyncio.to_thread(job.result)
        except UserError as exc:
            raise row_error(exc) from None
        self.metrics.requests.labels("/v1/score", "200").inc()
        return JSONResponse({"object": "list", "model": self.card.id, "data": [score_row(s) for s in scores]})


def create_app(
    loaded: LoadedModel,
    card: ModelCard,
    options: ServingOptions | None = None,
    api_keys: Iterable[str] = (),
) -> FastAPI:
    """The API around one loaded model; its batcher starts and stops with the app."""
    options = options or ServingOptions()
    batcher = RowBatcher(loaded.model, options.limits)
    metrics = ServerMetrics(
        running=lambda: len(batcher.rows),
        waiting=lambda: len(batcher.waiting),
        active_rows=options.limits.active_rows,
    )
    api = CompletionsApi(loaded, card, options, frozenset(api_keys), batcher, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        install_drain(batcher, "serve")  # under uvicorn: SIGTERM drains, then exit 0
        yield
        batcher.stop()

    app = FastAPI(
        title="lstm-textgen", summary="OpenAI-compatible completions of a recurrent LM", lifespan=lifespan
    )
    app.state.batcher, app.state.metrics, app.state.card, app.state.loaded = batcher, metrics, card, loaded

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.rejected.labels(exc.reason).inc()
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    def body_of(model: type[CompletionRequest] | type[ScoreRequest]) -> dict[str, Any]:
        schema = model.model_json_schema()
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    refusals = error_responses(400, 401, 404, 503, 504)
    streamed = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}
    app.post(
        "/v1/completions",
        openapi_extra=body_of(CompletionRequest),
        responses=streamed | refusals,
        summary="OpenAI's completions: plain, or streamed as server-sent events",
    )(api.completions)
    app.post(
        "/v1/score",
        openapi_extra=body_of(ScoreRequest),
        responses=refusals,
        summary="bits per character and per token, perplexity; each token's surprisal on per_token",
    )(api.score)

    @app.get("/v1/models", responses=error_responses(401))
    async def models(request: Request) -> JSONResponse:
        authorised(request, api.keys)
        return JSONResponse({"object": "list", "data": [card.as_openai()]})

    @app.get("/health", responses={503: {"description": "the model cannot step"}})
    async def health() -> JSONResponse:
        if batcher.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "the model cannot step"}, status_code=503)

    @app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics_page() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app

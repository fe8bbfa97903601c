"""What the served model adjusts in MLflow's scoring server, so that concurrent requests meet in one
batch, overload is answered at once (503 with `Retry-After`) and a client that goes away frees its
rows at the next step.

- MLflow runs each request's `predict` with `asyncio.to_thread`, on the event loop's default thread
  pool: `min(32, cores + 4)` threads, 6 on 2 cores. A request waiting for its rows holds a thread, so
  only 6 requests could ever step together, and the 7th would queue where no limit applies. The
  pool gets one thread per place of the batcher (active and waiting rows), created as needed, plus
  a few that answer the requests beyond them with a 503 in microseconds.
- MLflow turns an `MlflowException` into its HTTP status (TEMPORARILY_UNAVAILABLE is 503) with the
  message as JSON, but sets no headers. A 503 here also says when to come back; clients such as
  urllib3's `Retry` honour it.
- A request's `predict` runs on in its thread when the client disconnects. While it runs, the request
  is watched for the disconnect; `client_gone()` gives `predict` (which runs in a copy of the
  request's context) the event that is then set, and its rows leave the batch.

- `/ping` and `/health` answer 503 when the model's batcher cannot step (its thread is gone for good,
  or the model fails every step: a broken device), so that a supervisor restarts the server instead
  of sending it requests that would wait forever, and while it drains on SIGTERM (`drain.py`, which
  takes over uvicorn's handler as the server starts). MLflow's own answer only says the model loaded.

All of it happens in a wrapper of the server's exception handler, which `scoring_server.init` applies
after the model is loaded, inside the function that builds the app; outside the scoring server
nothing calls it. tests/test_serving.py checks
them over HTTP, so an MLflow that renames the handler fails there, not silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import sys
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

RETRY_AFTER_SECONDS = 1  # a step of every active row takes milliseconds: places free up fast
SPARE_THREADS = 4  # beyond one per place: they refuse what does not fit

_client_gone: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "lstm_textgen_client_gone", default=None
)


def client_gone() -> threading.Event | None:
    """The current request's "the client went away" event, inside the scoring server."""
    return _client_gone.get()


def overloaded(message: str) -> Exception:
    """The exception the served model raises when its batcher is full: HTTP 503."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    return MlflowException(f"{message} (after {RETRY_AFTER_SECONDS} s)", error_code=TEMPORARILY_UNAVAILABLE)


async def watch_disconnect(request: Any, gone: threading.Event) -> None:
    """Once the body is read, the next ASGI message of a request is its disconnect (Starlette's
    `is_disconnected` does not see it through MLflow's middleware: it waits here instead)."""
    message = await request.receive()
    if message.get("type") == "http.disconnect":
        gone.set()


def add_health_routes(app: Any, healthy: Callable[[], bool]) -> None:
    """`/ping` and `/health` ahead of MLflow's: 200 while `healthy()`, else 503 (Starlette matches
    routes in order, so the first route of a path answers)."""
    from fastapi.responses import Response
    from fastapi.routing import APIRoute

    async def health() -> Response:
        ok = healthy()
        return Response(
            content="\n" if ok else "the model cannot generate: restart the server\n",
            status_code=200 if ok else 503,
            media_type="application/json",
        )

    for path in ("/ping", "/health"):
        app.router.routes.insert(0, APIRoute(path, health, methods=["GET"]))


def run_at_startup(app: Any, action: Callable[[], None]) -> None:
    """`action()` as the app's lifespan starts: inside the running uvicorn server, on its main thread
    (where the served model's loading is not: uvicorn loads the app before it serves)."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        action()
        async with inner(app_) as state:
            yield state

    app.router.lifespan_context = lifespan


def adapt_scoring_server(
    places: int, healthy: Callable[[], bool] = lambda: True, at_startup: Callable[[], None] | None = None
) -> None:
    """Widen the request thread pool to `places` threads and a few spare, add `Retry-After` to 503s,
    watch each request for its client's disconnect, answer health checks with `healthy()`, run
    `at_startup()` once the server runs (idempotent; a no-op where MLflow's handler is not found)."""
    from mlflow.pyfunc import scoring_server

    handler = getattr(scoring_server, "_async_catch_mlflow_exception", None)
    if handler is None or getattr(handler, "adapted", False):
        return
    widened: set[int] = set()
    apps: set[int] = set()

    def adapted(endpoint: Any) -> Any:
        caught = handler(endpoint)
        app = sys._getframe(1).f_locals.get("app")  # init's FastAPI app, being built
        if app is not None and hasattr(app, "router") and id(app) not in apps:
            apps.add(id(app))
            add_health_routes(app, healthy)
            if at_startup is not None:
                run_at_startup(app, at_startup)

        @functools.wraps(endpoint)
        async def answer(*args: Any, **kwargs: Any) -> Any:
            loop = asyncio.get_running_loop()
            if id(loop) not in widened:  # before this request's predict goes to the pool
                widened.add(id(loop))
                loop.set_default_executor(
                    ThreadPoolExecutor(max_workers=places + SPARE_THREADS, thread_name_prefix="predict")
                )
            request, gone = kwargs.get("request"), threading.Event()
            watcher = None
            if request is not None:
                await request.body()  # read (and cached) first: the watcher's receive must not take it
                watcher = asyncio.create_task(watch_disconnect(request, gone))
            token = _client_gone.set(gone)
            try:
                response = await caught(*args, **kwargs)
            finally:
                _client_gone.reset(token)
                if watcher is not None:
                    watcher.cancel()
            if response.status_code == 503:
                response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response

        return answer

    adapted.adapted = True  # type: ignore[attr-defined]
    scoring_server._async_catch_mlflow_exception = adapted

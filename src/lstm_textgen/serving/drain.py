"""A server that drains on SIGTERM (a Kubernetes rolling update, `docker stop`, systemd): it stops
admitting rows (503 with `Retry-After`, /health 503 so that load balancers look elsewhere), lets the
rows already generating finish for up to LSTM_TEXTGEN_DRAIN_SECONDS, cuts what is left with an
error that says so, and then lets uvicorn shut down and the process exit 0. A second SIGTERM cuts at
once. Both servers run in uvicorn (`mlflow models serve` and `lstm-textgen serve`): uvicorn's own
SIGTERM handler would stop listening at once and, once its connections close, kill the process with
the signal again (exit code 143)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from lstm_textgen.errors import UserError
from lstm_textgen.inference.batcher import RowBatcher

DRAIN_VARIABLE = "LSTM_TEXTGEN_DRAIN_SECONDS"
# below the 30 s that Kubernetes (terminationGracePeriodSeconds) and `docker stop` wait before SIGKILL
DEFAULT_DRAIN_SECONDS = 20.0


def drain_seconds(env: Mapping[str, str] = os.environ) -> float:
    value = env.get(DRAIN_VARIABLE, str(DEFAULT_DRAIN_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise UserError(f"{DRAIN_VARIABLE} must be a number of seconds from 0 to 3600, got {value!r}")
    return seconds


def running_uvicorn_server() -> Any:
    """The uvicorn `Server` serving this process, from the SIGTERM handler it installs while it
    serves (its bound `handle_exit`); None outside one, or off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    return server if hasattr(server, "should_exit") else None


def drain_all(batchers: list[RowBatcher], seconds: float) -> int:
    """Drain every batcher at once (each stops admitting now); the rows cut short, in all."""
    cut = [0] * len(batchers)

    def one(index: int) -> None:
        cut[index] = batchers[index].drain(seconds)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(batchers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(cut)


def drain_on_sigterm(
    batchers: Callable[[], list[RowBatcher]], seconds: float, stop: Callable[[], None], who: str
) -> None:
    """From now on, SIGTERM drains the batchers that `batchers()` gives and then calls `stop` (see the
    module's docstring); a second SIGTERM cuts at once. Call on the main thread.

    The handler only writes a byte to a pipe: a handler runs between two bytecodes of the main
    thread, even inside itself when signals come in quick succession (`mlflow models serve` passes
    its SIGTERM on to the server that already got one), so one that took a lock (an Event, starting
    a thread, printing) could wait forever on the lock that it holds itself."""
    read_end, write_end = os.pipe()

    def drain_then_stop(grace: float) -> None:
        cut = drain_all(batchers(), grace)
        outcome = f"{cut} unfinished text(s) cut short" if cut else "every text finished"
        print(f"{who}: drained, {outcome}; stopping", file=sys.stderr, flush=True)
        stop()

    def on_each_sigterm() -> None:
        received = 0
        while os.read(read_end, 1):
            grace = 0.0 if received else seconds  # a second SIGTERM: now
            received += 1
            print(f"{who}: SIGTERM: draining for up to {grace:g} s, new requests get 503", file=sys.stderr)
            threading.Thread(target=drain_then_stop, args=(grace,), name="drain", daemon=True).start()

    threading.Thread(target=on_each_sigterm, name="sigterm", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda signum, frame: os.write(write_end, b"T"))


def install_drain(batcher: RowBatcher, who: str, env: Mapping[str, str] = os.environ) -> bool:
    """Drain `batcher` on SIGTERM when this process is a uvicorn server (called while it starts, on
    its main thread), then end the server as if it had finished, with no signal to raise again;
    False where there is none, and SIGTERM is left as it is."""
    server = running_uvicorn_server()
    if server is None:
        return False

    def stop() -> None:
        server.should_exit = True

    drain_on_sigterm(lambda: [batcher], drain_seconds(env), stop, who)
    return True

"""Stopping a training run on request. SIGTERM (`kill`, systemd, CI timeouts, cluster schedulers,
torchrun) and SIGINT (Ctrl-C) during training only set a flag; the loop reads it between steps and
stops at a step boundary with a resumable checkpoint, instead of an exception landing in the middle
of an optimizer step. A second signal stops at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from lstm_textgen.errors import Terminated


@dataclass
class StopRequest:
    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exception(self) -> BaseException:
        """What the run ends with: KeyboardInterrupt for Ctrl-C (exit 130), Terminated otherwise (143)."""
        if self.signum == signal.SIGINT:
            return KeyboardInterrupt()
        name = signal.Signals(self.signum).name if self.signum else "another process's stop request"
        return Terminated(f"stopped by {name}")


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """While inside, SIGINT and SIGTERM are noted in the yielded request (main thread only)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def note(signum: int, frame: FrameType | None) -> None:
        if request.requested:  # asked twice: stop now
            raise request.exception()
        request.signum = signum

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

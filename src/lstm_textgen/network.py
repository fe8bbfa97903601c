"""What the servers (the tracking server, the tests' and benchmarks' servers) share: ports, and
URLs as they may be shown."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now (for a server or a rendezvous)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def without_password(url: str) -> str:
    """A URL as it may be printed or logged: its password, if any, as ***."""
    from urllib.parse import urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:  # not a URL at all (a bad port): nothing to hide in it
        return url
    return url.replace(f":{password}@", ":***@", 1) if password else url


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether something answers HTTP at `url` (any status: a 401 or a 503 is an answer)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def wait_until(
    ready: Callable[[], bool], what: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Until `ready()` holds; a `TimeoutError` naming `what` at the deadline, or as soon as `process`
    (the server being waited for) has ended."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process is not None and process.poll() is not None:
            raise TimeoutError(f"{what} never answered: its server ended with exit code {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer within {timeout_s:.0f} s")
        time.sleep(0.25)


def wait_until_answers(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Until something answers HTTP at `url` (see `wait_until`)."""
    wait_until(lambda: answers(url), url, timeout_s, process)

"""What the servers (the tracking server, the tests' and benchmarks' servers) share: ports, and
URLs as they may be shown."""

from __future__ import annotations

import socket


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

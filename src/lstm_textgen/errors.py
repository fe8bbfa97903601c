"""What a failure looks like: the one exception type for problems a user can fix, and how every entry
point reports it. A user error prints one clear message and exits non-zero, and SIGTERM (`kill`, a
scheduler, torchrun stopping the other workers when one failed) unwinds like Ctrl-C, so open MLflow runs
are closed as failed instead of being left RUNNING."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType


class UserError(Exception):
    """Bad input (params, data, prompt, download): the message names the problem and the fix."""

    # Raised by every rank of a distributed run at once (a decision they share): only rank 0 prints it.
    every_rank = False
    exit_code = 2


class Terminated(BaseException):
    """SIGTERM arrived (kill, a scheduler, torchrun stopping the workers). A BaseException, like
    KeyboardInterrupt, so `except Exception` lets it pass and open MLflow runs are marked failed."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    shutting_down()
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


def shutting_down() -> None:
    """Called on the way out after a failure: a SIGTERM arriving now (torchrun stopping the workers
    after one died) would only interrupt the clean-up (the MLflow run being marked failed), so
    further ones are ignored. Only where `run_main` installed its handler."""
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _is_main_rank() -> bool:
    """Rank 0 of a distributed run, or a process that is not one."""
    return os.environ.get("RANK", "0") == "0"


def run_main(main: Callable[[], None]) -> None:
    """Call `main`; a UserError becomes `error: <message>` on stderr and exit code 2 (no traceback);
    Ctrl-C exits 130 and SIGTERM 143, as shells report them."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main()
    except UserError as exc:
        if _is_main_rank() or not exc.every_rank:
            prefix = "" if "RANK" not in os.environ else f"rank {os.environ['RANK']}: "
            print(f"{prefix}error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated as exc:
        if _is_main_rank():
            print(str(exc), file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)

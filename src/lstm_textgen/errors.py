"""The one exception type for problems a user can fix; entry points print it without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (params, data, prompt, download): the message names the problem and the fix."""

    # Raised by every rank of a distributed run at once (a decision they share): only rank 0 prints it.
    every_rank = False
    exit_code = 2


class Terminated(BaseException):
    """SIGTERM arrived (kill, a scheduler, torchrun stopping the workers). A BaseException, like
    KeyboardInterrupt, so `except Exception` lets it pass and open MLflow runs are marked failed."""

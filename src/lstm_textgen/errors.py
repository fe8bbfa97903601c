"""The one exception type for problems a user can fix; entry points print it without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (params, data, prompt, download): the message names the problem and the fix."""

"""What every entry point shares: a user error prints one clear message and exits non-zero."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_main(main: Callable[[], None]) -> None:
    """Call `main`; a UserError becomes `error: <message>` on stderr and exit code 2 (no traceback)."""
    from lstm_textgen.errors import UserError

    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

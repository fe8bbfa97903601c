"""The DVC stages: one thin script each, run as `python stages/NAME.py` (never imported by the
library, never by each other; a package only so that import-linter can hold them to that)."""

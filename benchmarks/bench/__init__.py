"""`make bench`: lstm-textgen against the reference notebook's approach, measured in the same run.

Modules, one job each: `goals` (what counts as good), `machine` (what it ran on), `measure` (the five
measurements), `flops` (model FLOP utilisation), `report` (Markdown and PNG), `__main__` (the command).
"""

"""`make bench`: lstm-textgen against the reference notebook's approach, measured in the same run.

Modules, one job each: `measure` (the five measurements), `flops` (model FLOP utilisation), `report`
(Markdown and PNG), `__main__` (the command); what every benchmark shares is in `benchmarks/common.py`.
"""

"""The `lstm-textgen` command and what it runs: sample, score, demo, plots, compare, presets."""

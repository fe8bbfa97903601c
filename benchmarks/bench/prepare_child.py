"""Build one approach's training inputs in a fresh process, so its peak memory is its own:
`python -m benchmarks.bench.prepare_child ours|notebook CORPUS` prints one JSON line."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from benchmarks import notebook_baseline as notebook
from lstm_textgen.data.preparation import build_dataset
from lstm_textgen.params import DataParams


def build(kind: str, corpus: Path) -> dict[str, float]:
    text = corpus.read_text(encoding="utf-8")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if kind == "ours":
        dataset = build_dataset(text, DataParams(val_fraction=0.1, test_fraction=0.0))
        size = sum(a.nbytes for a in dataset.splits.values())
    else:
        x, y, _ = notebook.build_float_windows(text)
        size = x.nbytes + y.nbytes
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "peak_rss_mb": peak / 1024,
        "added_rss_mb": (peak - base) / 1024,
        "input_mb": size / 2**20,
    }


if __name__ == "__main__":
    print(json.dumps(build(sys.argv[1], Path(sys.argv[2]))))

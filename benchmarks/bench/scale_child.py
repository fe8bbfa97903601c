"""One measured job of `make bench-scale`, in a process of its own so that its peak resident memory
is its own. Prints one JSON line: the job's seconds (imports excluded) and its statistics.

    python -m benchmarks.bench.scale_child normalise CORPUS OUT
    python -m benchmarks.bench.scale_child prepare LEVEL CORPUS OUT_DIR
    python -m benchmarks.bench.scale_child train PREPARED_DIR STEPS
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from lstm_textgen.params import CorpusSpec, DataParams, DownloadParams

BPE_VOCAB = 1024


def normalise(corpus: Path, out: Path) -> dict[str, Any]:
    from lstm_textgen.corpora import acquire

    summary = acquire("synthetic", CorpusSpec(source=str(corpus)), DownloadParams(), out)
    return {"characters": summary["characters"]}


def prepare(level: str, corpus: Path, out: Path) -> dict[str, Any]:
    from lstm_textgen.preparation import prepare_corpus

    stats = prepare_corpus(corpus, DataParams(level=level, vocab_size=BPE_VOCAB), out)
    return {"vocab_size": stats["vocab_size"], "tokens": sum(stats["tokens"].values())}


def train(prepared: Path, steps: int) -> dict[str, Any]:
    """Tokens per second of the default model (params.yaml) on the prepared training split."""

    from benchmarks.bench.measure import REPO
    from lstm_textgen.dataset import load_dataset
    from lstm_textgen.devices import configure_backend, resolve_device, resolve_dtype
    from lstm_textgen.params import load_params
    from lstm_textgen.training import new_train_state, train_step

    params = load_params(REPO / "params.yaml")
    dataset = load_dataset(prepared)
    device = resolve_device(params.train.device)
    dtype = resolve_dtype(params.train.dtype, device, params.model.cell)
    configure_backend(device, params.train.threads)
    state = new_train_state(dataset.splits["train"], len(dataset.vocab), params, device, dtype)
    for _ in range(20):  # warm-up: allocator, oneDNN kernels
        train_step(state, state.model, params.train.lr, params.train, dtype)
    started = time.perf_counter()
    for _ in range(steps):
        loss = train_step(state, state.model, params.train.lr, params.train, dtype)
    loss.item()
    seconds = time.perf_counter() - started
    tokens = steps * params.train.batch_size * params.data.seq_len
    return {"tokens_per_sec": tokens / seconds, "split_tokens": len(dataset.splits["train"])}


def peak_rss_kb() -> int:
    """This process's peak resident memory since its exec (ru_maxrss would include the parent's
    memory at fork time)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))


def main(argv: list[str]) -> None:
    job, *args = argv
    start_rss_kb = peak_rss_kb()
    started = time.perf_counter()
    if job == "normalise":
        result = normalise(Path(args[0]), Path(args[1]))
    elif job == "prepare":
        result = prepare(args[0], Path(args[1]), Path(args[2]))
    elif job == "train":
        result = train(Path(args[0]), int(args[1]))
    else:
        raise SystemExit(f"unknown job {job!r}")
    result |= {"seconds": time.perf_counter() - started, "start_rss_mb": start_rss_kb / 1024}
    result["peak_rss_mb"] = peak_rss_kb() / 1024

    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

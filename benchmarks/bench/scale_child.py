"""One measured job of `make bench-scale`, in a process of its own so that its peak resident memory
is its own. Prints one JSON line: the job's seconds (imports excluded) and its statistics.

    python -m benchmarks.bench.scale_child normalise CORPUS OUT
    python -m benchmarks.bench.scale_child prepare LEVEL CORPUS OUT_DIR
    python -m benchmarks.bench.scale_child train PREPARED_DIR BASELINE_PREPARED_DIR STEPS
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
    from lstm_textgen.data.corpora import acquire

    summary = acquire("synthetic", CorpusSpec(source=str(corpus)), DownloadParams(), out)
    return {"characters": summary["characters"]}


def prepare(level: str, corpus: Path, out: Path) -> dict[str, Any]:
    from lstm_textgen.data.preparation import prepare_corpus

    stats = prepare_corpus(corpus, DataParams(level=level, vocab_size=BPE_VOCAB), out)
    return {"vocab_size": stats["vocab_size"], "tokens": sum(stats["tokens"].values())}


def train(prepared: Path, baseline: Path, steps: int, rounds: int = 5) -> dict[str, Any]:
    """Tokens per second of the default model (params.yaml) on the prepared training split and on the
    baseline's, in alternating rounds (a shared host's speed drifts); medians of the rounds."""
    import statistics

    from benchmarks.common import REPO
    from lstm_textgen.data.dataset import load_dataset
    from lstm_textgen.devices import configure_backend, resolve_device, resolve_dtype
    from lstm_textgen.params import load_params
    from lstm_textgen.train.setup import new_train_state
    from lstm_textgen.train.step import train_step

    params = load_params(REPO / "params.yaml")
    device = resolve_device(params.train.device)
    dtype = resolve_dtype(params.train.dtype, device, params.model.cell)
    configure_backend(device, params.train.threads)
    datasets = {"big": load_dataset(prepared), "small": load_dataset(baseline)}
    splits = {name: dataset.splits["train"] for name, dataset in datasets.items()}
    vocab_size = len(datasets["big"].vocab)  # one model shape for both
    states = {
        name: new_train_state(ids, vocab_size, params, device=device, dtype=dtype)
        for name, ids in splits.items()
    }
    rates: dict[str, list[float]] = {"big": [], "small": []}
    for round_ in range(rounds + 1):  # round 0 warms up the allocator and the kernels
        for name in ("small", "big") if round_ % 2 else ("big", "small"):
            state = states[name]
            started = time.perf_counter()
            for _ in range(steps // rounds):
                loss = train_step(state, state.model, params.train.lr, params.train, dtype)
            loss.item()
            if round_:
                tokens = steps // rounds * params.train.batch_size * params.data.seq_len
                rates[name].append(tokens / (time.perf_counter() - started))
    ratios = [big / small for big, small in zip(rates["big"], rates["small"], strict=True)]
    return {
        "tokens_per_sec": statistics.median(rates["big"]),
        "baseline_tokens_per_sec": statistics.median(rates["small"]),
        "ratio": statistics.median(ratios),
        "split_tokens": len(splits["big"]),
        "baseline_tokens": len(splits["small"]),
    }


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
        result = train(Path(args[0]), Path(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown job {job!r}")
    result |= {"seconds": time.perf_counter() - started, "start_rss_mb": start_rss_kb / 1024}
    result["peak_rss_mb"] = peak_rss_kb() / 1024

    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

"""`python -m benchmarks.bench`: measure, then write report.md, results.json and bench.png to
benchmarks/results/<kind of machine>/.

    python -m benchmarks.bench --corpus ../shared/corpora/tinyshakespeare.txt
    python -m benchmarks.bench --quick --out /tmp/bench      # smoke run of every part, tiny budgets
    python -m benchmarks.bench --render benchmarks/results/KIND/results.json   # rewrite a report
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import notebook_baseline as notebook
from benchmarks.bench.flops import model_flop_utilisation
from benchmarks.bench.measure import (
    REPO,
    measure_generation,
    measure_gpu,
    measure_prepare,
    measure_quality,
    measure_training,
)
from benchmarks.bench.report import write_report
from benchmarks.common import load_corpus, machine, results_dir
from lstm_textgen.data.preparation import build_dataset
from lstm_textgen.devices import DTYPES, resolve_device
from lstm_textgen.files import write_text
from lstm_textgen.params import load_params


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--corpus", default="tinyshakespeare", help="corpora key, path or URL")
    parser.add_argument("--budget-s", type=float, default=180.0, help="training seconds of the quality run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/<kind of machine>/"
    )
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run of every code path")
    parser.add_argument(
        "--render", type=Path, help="only rewrite report.md and the PNG from this results.json"
    )
    return parser.parse_args()


def fast_float_windows(text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The notebook's arrays built with numpy: the throughput part measures its training only."""
    chars = sorted(set(text))
    ids = np.searchsorted(np.array(chars), np.array(list(text)))
    windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], notebook.WINDOW)
    x = (windows.astype(np.float32) / len(chars))[..., None]
    return x, ids[notebook.WINDOW :].astype(np.int64), chars


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    params = load_params(REPO / "params.yaml")
    text = load_corpus(args.corpus, params, workdir)[: 60_000 if args.quick else None]
    corpus_path = workdir / "corpus.txt"
    corpus_path.write_text(text, encoding="utf-8")
    dataset = build_dataset(text, params.data.model_copy(update={"val_fraction": 0.1, "test_fraction": 0.0}))
    info = machine()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": info, "corpus": args.corpus}
    results["characters"] = len(text)
    print("bench: prepare ...", flush=True)
    results["prepare"] = measure_prepare(corpus_path, args.repeats)
    print("bench: training throughput ...", flush=True)
    x, y, chars = notebook.build_float_windows(text) if args.quick else fast_float_windows(text)
    training = measure_training(
        dataset.splits, len(dataset.vocab), params, (x, y, len(chars)), args.repeats, 4 if args.quick else 20
    )
    del x, y
    device = resolve_device(params.train.device)
    training["mfu"] = model_flop_utilisation(
        training["ours"]["median"], params.model, len(dataset.vocab), DTYPES[training["dtype"]], device
    )
    results["training"] = training
    print(f"bench: quality in {args.budget_s:.0f} s ...", flush=True)
    results["quality"] = measure_quality(
        dataset.splits,
        dataset.vocab,
        params,
        args.budget_s,
        training["ours"]["median"],
        workdir,
        max_steps=24 if args.quick else None,
    )
    print("bench: generation ...", flush=True)
    checkpoint = Path(results["quality"].pop("checkpoint"))
    lengths = (50, 5) if args.quick else (500, 40)
    results["generation"] = measure_generation(checkpoint, len(chars), args.repeats, *lengths)
    results["gpu"] = measure_gpu(dataset.splits, dataset.vocab, params, workdir)
    return results


def main() -> None:
    args = parse_args()
    if args.render:
        write_report(json.loads(args.render.read_text()), args.render.parent)
        return
    if args.quick:
        args.budget_s, args.repeats = min(args.budget_s, 4.0), 1
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args, Path(tmp))
    out = args.out or results_dir(results["machine"]["kind"])
    out.mkdir(parents=True, exist_ok=True)
    write_report(results, out)
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()

"""`make bench-serving`: the registered champion behind `mlflow models serve` (loopback only), with
continuous batching off (each request generates alone in its own thread) and on (every request's rows
step together), 1, 4, 16 and 64 concurrent single-row clients, one server worker and one per core:
requests/s, generated characters/s, p50/p99 latency. In the same run and on the same model, the
generation path's own batch-64 rate (no server), the served model's `predict` from 16 and 64
threads without a server, the demo's time to first token with 1 and 16 streams at once, and a step's
recurrent product in float32 against bfloat16. Written to benchmarks/results/<machine>/serving.md.
Needs `make repro` first.

    python -m benchmarks.bench_serving [--requests-per-client 4] [--tokens 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from benchmarks.common import REPO, free_port, machine, results_dir
from lstm_textgen.files import write_json, write_text

CLIENTS = (1, 4, 16, 64)
PROMPT = "ROMEO:"
GOAL_16 = 5.0  # 16 clients, one worker: batching on over off
GOAL_64 = 0.5  # 64 clients, one worker: batching on over the generation path's batch-64 rate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models:/lstm-textgen-shakespeare-char@champion")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=100, help="max_new_tokens of each row")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--if-available", action="store_true", help="no champion: say so and stop (make bench)"
    )
    return parser.parse_args()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}")


def model_registered(model: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, _, alias = model.removeprefix("models:/").partition("@")
    try:
        MlflowClient(tracking_uri=tracking_uri()).get_model_version_by_alias(name, alias)
    except MlflowException:
        return False
    return True


def start_server(model: str, workers: int, batching: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri(),
        "LSTM_TEXTGEN_BATCHING": "on" if batching else "off",
    }
    cmd = ["mlflow", "models", "serve", "-m", model, "-h", "127.0.0.1", "-p", str(port)]
    cmd += ["--env-manager", "local", "--workers", str(workers)]
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench-serving: the server for {model} exited; run `make repro` first")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("bench-serving: the server did not answer /ping within 120 s")


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def load(url: str, clients: int, count: int, tokens: int) -> dict[str, Any]:
    """`count` single-row requests from `clients` threads; each answered request's latency."""

    def one(i: int) -> float:
        body = {"dataframe_records": [{"prompt": PROMPT, "max_new_tokens": tokens, "seed": i}]}
        started = time.perf_counter()
        response = requests.post(f"{url}/invocations", json=body, timeout=300)
        response.raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = sorted(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": count,
        "requests_per_sec": count / wall,
        "characters_per_sec": count * tokens / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 0.99),
    }


def generation_rate(loaded: Any, rows: int, tokens: int) -> float:
    """The generation path without a server: `rows` prompts at once, characters/s (best of 3)."""
    from lstm_textgen.inference.generation import generate
    from lstm_textgen.params import Sampling

    ids = [[int(i) for i in loaded.vocab.encode(PROMPT)]] * rows
    generate(loaded.model, ids, 10, Sampling(seed=1))
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        generate(loaded.model, ids, tokens * 4, Sampling(seed=1))
        best = max(best, rows * tokens * 4 / (time.perf_counter() - started))
    return best


def first_token_times(loaded: Any, streams: int, tokens: int, batching: bool) -> list[float]:
    """The demo's `stream_generation` from `streams` threads at once: seconds to the first text.
    Batching off: each stream steps alone, in a batcher of its own."""
    from lstm_textgen.apps.demo import stream_generation
    from lstm_textgen.inference.batcher import RowBatcher

    shared = RowBatcher(loaded.model).start() if batching else None
    times: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(streams)

    def one(seed: int) -> None:
        batcher = shared or RowBatcher(loaded.model).start()
        start.wait()
        began = time.perf_counter()
        frames = stream_generation(loaded, batcher, PROMPT, {"max_new_tokens": tokens, "seed": seed})
        for text, _ in frames:
            if len(text) > len(PROMPT):
                with lock:
                    times.append(time.perf_counter() - began)
                break
        frames.close()

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(times)


def predict_rate(model: str, clients: int, tokens: int, per_client: int) -> float:
    """The served model's `predict` called from `clients` threads in this process, no HTTP server:
    generated characters/s (what the batcher makes of concurrent callers by itself)."""
    import mlflow.pyfunc
    import pandas as pd

    served = mlflow.pyfunc.load_model(model)
    frames = [
        pd.DataFrame({"prompt": [PROMPT], "max_new_tokens": [tokens], "seed": [seed]})
        for seed in range(clients)
    ]
    served.predict(frames[0])

    def client(frame: Any) -> None:
        for _ in range(per_client):
            served.predict(frame)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, frames))
    return clients * per_client * tokens / (time.perf_counter() - started)


def step_matmul_us(hidden: int, gates: int, batch: int, dtype: Any) -> float:
    """Microseconds of one generation step's recurrent product (state [batch, hidden] times the
    [hidden, gates] weights, plus the bias) in `dtype`, the casts to and from float32 included."""
    import torch

    h, w, b = torch.randn(batch, hidden), torch.randn(hidden, gates).to(dtype), torch.randn(gates).to(dtype)

    def step() -> Any:
        return torch.addmm(b, h.to(dtype), w).float()

    for _ in range(50):
        step()
    started = time.perf_counter()
    for _ in range(500):
        step()
    return (time.perf_counter() - started) / 500 * 1e6


def measure_in_process(model: str, tokens: int) -> dict[str, Any]:
    from lstm_textgen.tracking.registry import load_source

    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    loaded = load_source(model, "cpu")
    results: dict[str, Any] = {
        "batch_1_chars_per_sec": generation_rate(loaded, 1, tokens),
        "batch_64_chars_per_sec": generation_rate(loaded, 64, tokens),
        "first_token": [],
        "predict_chars_per_sec": {clients: predict_rate(model, clients, tokens, 4) for clients in (16, 64)},
    }
    import torch

    rnn = loaded.model.rnn
    gates = rnn.weight_hh_l0.shape[0]
    results["step_matmul_us"] = {
        batch: {
            str(dtype): step_matmul_us(rnn.hidden_size, gates, batch, dtype)
            for dtype in (torch.float32, torch.bfloat16)
        }
        for batch in (1, 16, 64)
    }
    for batching in (False, True):
        for streams in (1, 16):
            first_token_times(loaded, streams, 50, batching)  # warm-up
            times = first_token_times(loaded, streams, 2000, batching)
            results["first_token"].append(
                {
                    "batching": batching,
                    "streams": streams,
                    "p50_s": statistics.median(times),
                    "max_s": times[-1],
                }
            )
    return results


def ratio(runs: list[dict[str, Any]], workers: int, clients: int) -> float:
    on, off = (
        next(r for r in runs if (r["workers"], r["clients"], r["batching"]) == (workers, clients, b))
        for b in (True, False)
    )
    return on["characters_per_sec"] / off["characters_per_sec"]


def report(results: dict[str, Any]) -> str:
    info, local, runs = results["machine"], results["in_process"], results["runs"]
    lines = [
        f"# Serving under load ({results['date']})",
        "",
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; `{results['model']}` behind "
        f"`mlflow models serve` on 127.0.0.1; each client sends {results['requests_per_client']} "
        f"single-row requests of {results['tokens']} new characters, one after another; "
        "`make bench-serving`.",
        "",
        "| batching | server workers | clients | requests/s | generated characters/s | p50 | p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {'on' if r['batching'] else 'off'} | {r['workers']} | {r['clients']} | "
            f"{r['requests_per_sec']:.1f} | {r['characters_per_sec']:,.0f} | "
            f"{r['p50_s'] * 1000:.0f} ms | {r['p99_s'] * 1000:.0f} ms |"
        )
    on_64 = next(r for r in runs if (r["workers"], r["clients"], r["batching"]) == (1, 64, True))
    batch_64, predicted = local["batch_64_chars_per_sec"], local["predict_chars_per_sec"]
    lines += [
        "",
        f"- 16 clients, one worker: batching on / off = **{ratio(runs, 1, 16):.1f}x** (goal ≥ {GOAL_16:g}x); "
        f"two workers: {ratio(runs, 2, 16):.1f}x.",
        f"- 64 clients, one worker: {on_64['characters_per_sec']:,.0f} characters/s = "
        f"**{on_64['characters_per_sec'] / batch_64:.0%}** of the generation path's batch-64 rate "
        f"without a server ({batch_64:,.0f}; batch 1: {local['batch_1_chars_per_sec']:,.0f}) "
        f"(goal ≥ {GOAL_64:.0%}). The served model's `predict` from 64 threads in-process, no HTTP: "
        f"{predicted[64]:,.0f} characters/s ({predicted[64] / batch_64:.0%}); from 16: {predicted[16]:,.0f}.",
        "",
        "The demo's stream (`stream_generation`, in-process), time to the first text:",
        "",
        "| batching | streams at once | p50 | slowest |",
        "|---|---|---|---|",
    ]
    for r in local["first_token"]:
        lines.append(
            f"| {'on' if r['batching'] else 'off'} | {r['streams']} | {r['p50_s'] * 1000:.1f} ms | "
            f"{r['max_s'] * 1000:.1f} ms |"
        )
    lines += [
        "",
        "A step's recurrent product (state times weights, casts included) in float32 and bfloat16:",
        "",
        "| rows stepping | float32 | bfloat16 |",
        "|---|---|---|",
    ]
    for batch, by_dtype in local["step_matmul_us"].items():
        lines.append(
            f"| {batch} | {by_dtype['torch.float32']:.1f} µs | {by_dtype['torch.bfloat16']:.1f} µs |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.if_available and not model_registered(args.model):
        print(f"bench-serving: {args.model} is not registered (run `make repro` first); serving not measured")
        return
    info = machine()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": info, "model": args.model}
    results |= {"requests_per_client": args.requests_per_client, "tokens": args.tokens, "runs": []}
    for workers in (1, os.cpu_count() or 1):
        for batching in (False, True):
            process, url = start_server(args.model, workers, batching)
            try:
                load(url, 16, 32, args.tokens)  # warm-up: every worker loads and answers
                for clients in CLIENTS:
                    print(
                        f"bench-serving: batching {batching}, {workers} worker(s), {clients} clients",
                        flush=True,
                    )
                    measured = load(url, clients, clients * args.requests_per_client, args.tokens)
                    results["runs"].append({"workers": workers, "batching": batching, **measured})
            finally:
                process.terminate()
                process.wait(timeout=30)
    print("bench-serving: the generation path and the demo's stream, in-process", flush=True)
    results["in_process"] = measure_in_process(args.model, args.tokens)
    text = report(results)
    print(text)
    out = args.out or results_dir(info["kind"])
    write_text(out / "serving.md", text)
    write_json(out / "serving.json", results)


if __name__ == "__main__":
    main()

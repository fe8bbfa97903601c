"""`make bench-serving`: the registered champion behind `mlflow models serve` (loopback only), 16
concurrent clients sending a fixed number of requests, then it stops. Requests per second, generated
characters per second and p50/p99 latency, for batch 1 and batch 16 requests and for 1 and 2 server
workers, written to benchmarks/results/<machine>/serving.md. Needs `make repro` first (the champion).

    python -m benchmarks.bench_serving [--requests 64] [--tokens 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from benchmarks.common import REPO, free_port, machine, results_dir
from lstm_textgen.files import write_json, write_text

CLIENTS = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models:/lstm-textgen-shakespeare-char@champion")
    parser.add_argument("--requests", type=int, default=64, help="per configuration")
    parser.add_argument("--tokens", type=int, default=100, help="max_new_tokens of each row")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--if-available", action="store_true", help="no champion: say so and stop (make bench)"
    )
    return parser.parse_args()


def model_registered(model: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, _, alias = model.removeprefix("models:/").partition("@")
    uri = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}")
    try:
        MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return False
    return True


def start_server(model: str, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}"),
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


def load(url: str, batch: int, count: int, tokens: int) -> dict[str, Any]:
    """`count` requests of `batch` rows from CLIENTS threads; each answered request's latency."""
    body = {"dataframe_records": [{"prompt": "ROMEO:", "max_new_tokens": tokens, "seed": 1}] * batch}

    def one(_: int) -> float:
        started = time.perf_counter()
        response = requests.post(f"{url}/invocations", json=body, timeout=300)
        response.raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        latencies = sorted(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    return {
        "batch": batch,
        "requests": count,
        "requests_per_sec": count / wall,
        "characters_per_sec": count * batch * tokens / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def report(results: dict[str, Any]) -> str:
    info = results["machine"]
    lines = [
        f"# Serving under load ({results['date']})",
        "",
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; `{results['model']}` behind "
        f"`mlflow models serve` on 127.0.0.1, {CLIENTS} concurrent clients, {results['requests']} requests "
        f"of {results['tokens']} new characters per row, `make bench-serving`.",
        "",
        "| server workers | rows per request | requests/s | generated characters/s | p50 | p99 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['workers']} | {r['batch']} | {r['requests_per_sec']:.2f} | "
            f"{r['characters_per_sec']:,.0f} | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.if_available and not model_registered(args.model):
        print(f"bench-serving: {args.model} is not registered (run `make repro` first); serving not measured")
        return
    info = machine()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": info, "model": args.model}
    results |= {"requests": args.requests, "tokens": args.tokens, "runs": []}
    for workers in (1, 2):
        process, url = start_server(args.model, workers)
        try:
            for batch in (1, 16):
                print(f"bench-serving: {workers} worker(s), batch {batch} ...", flush=True)
                load(url, batch, CLIENTS, args.tokens)  # warm-up: every worker loads and answers once
                results["runs"].append({"workers": workers, **load(url, batch, args.requests, args.tokens)})
        finally:
            process.terminate()
            process.wait(timeout=30)
    text = report(results)
    print(text)
    out = args.out or results_dir(info["kind"])
    write_text(out / "serving.md", text)
    write_json(out / "serving.json", results)


if __name__ == "__main__":
    main()

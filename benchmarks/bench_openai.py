"""`make bench-serving` (second part): `lstm-textgen serve` against `mlflow models serve`, in one run, on
the same registered model, one worker each on 127.0.0.1: 1, 16, 64 and 256 concurrent single-row
clients, plain and (this server only: MLflow's cannot) streaming. Generated characters/s,
requests/s, p50/p99 end-to-end latency and time to first token, refusals (503 with Retry-After);
beside them the generation path's own batch-64 rate without a server, measured in the same run.
Written to benchmarks/results/<machine>/serving-openai.md. Needs `make repro` first.

    python -m benchmarks.bench_openai [--requests-per-client 4] [--tokens 100] [--clients 1,16,64,256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from benchmarks.bench_serving import PROMPT, generation_rate, model_registered, percentile, tracking_uri
from benchmarks.common import REPO, free_port, machine, results_dir
from lstm_textgen.files import write_json, write_text
from lstm_textgen.network import wait_until_answers

GOAL_64 = 0.5  # 64 single-row clients over the generation path's batch-64 rate
GOAL_TTFT_P99_S = 0.1  # 16 streaming clients


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models:/lstm-textgen-shakespeare-char@champion")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=100, help="new characters of each row")
    parser.add_argument("--clients", default="1,16,64,256")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--if-available", action="store_true", help="no champion: say so and stop (make bench)"
    )
    return parser.parse_args()


def start(command: list[str], health: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    process = subprocess.Popen(
        [*command, "--port" if command[0] == "lstm-textgen" else "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_answers(f"{url}{health}", 180, process)  # type: ignore[arg-type]
    return process, url


def mlflow_request(url: str, tokens: int, seed: int, stream: bool) -> tuple[int, float, float]:
    body = {"dataframe_records": [{"prompt": PROMPT, "max_new_tokens": tokens, "seed": seed}]}
    started = time.perf_counter()
    answer = requests.post(f"{url}/invocations", json=body, timeout=600)
    elapsed = time.perf_counter() - started
    return answer.status_code, elapsed, elapsed


def openai_request(url: str, tokens: int, seed: int, stream: bool, model: str) -> tuple[int, float, float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "seed": seed, "stream": stream}
    started = time.perf_counter()
    first = None
    with requests.post(f"{url}/v1/completions", json=body, timeout=600, stream=stream) as answer:
        if answer.status_code != 200 or not stream:
            answer.content  # noqa: B018  (read the whole answer)
            elapsed = time.perf_counter() - started
            return answer.status_code, elapsed, elapsed
        for line in answer.iter_lines():
            texted = line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]
            if first is None and texted:
                first = time.perf_counter() - started
    elapsed = time.perf_counter() - started
    return 200, elapsed, first if first is not None else elapsed


def cpu_seconds(pid: int) -> float:
    """CPU time of a server process and its children (MLflow's server runs uvicorn as a child)."""
    import psutil

    process = psutil.Process(pid)
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        times = each.cpu_times()
        total += times.user + times.system
    return total


def load(send: Any, clients: int, count: int, server_pid: int | None = None) -> dict[str, Any]:
    server_before = cpu_seconds(server_pid) if server_pid else 0.0
    client_before = time.process_time()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        outcomes = list(pool.map(send, range(count)))
    wall = time.perf_counter() - started
    server_cpu = (cpu_seconds(server_pid) - server_before) if server_pid else 0.0
    client_cpu = time.process_time() - client_before
    answered = [o for o in outcomes if o[0] == 200]
    latencies = sorted(o[1] for o in answered) or [float("nan")]
    first = sorted(o[2] for o in answered) or [float("nan")]
    return {
        "clients": clients,
        "requests": count,
        "answered": len(answered),
        "refused": {
            str(code): sum(1 for o in outcomes if o[0] == code) for code in {o[0] for o in outcomes} - {200}
        },
        "requests_per_sec": len(answered) / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 0.99),
        "ttft_p50_s": statistics.median(first),
        "ttft_p99_s": percentile(first, 0.99),
        "wall_s": wall,
        "server_cpu_share": server_cpu / wall,  # cores the server kept busy
        "client_cpu_share": client_cpu / wall,  # cores these client threads took from it
    }


def measure(args: argparse.Namespace, name: str) -> list[dict[str, Any]]:
    clients = [int(c) for c in args.clients.split(",")]
    servers = {
        "mlflow models serve": (
            ["mlflow", "models", "serve", "-m", args.model, "-h", "127.0.0.1", "--env-manager", "local"],
            "/ping",
            lambda url, stream: lambda i: mlflow_request(url, args.tokens, i, stream),
            (False,),
        ),
        "lstm-textgen serve": (
            ["lstm-textgen", "serve", args.model, "--host", "127.0.0.1"],
            "/health",
            lambda url, stream: lambda i: openai_request(url, args.tokens, i, stream, name),
            (False, True),
        ),
    }
    runs = []
    for server, (command, health, sender, modes) in servers.items():
        process, url = start(command, health)
        try:
            load(sender(url, False), 16, 32)  # warm-up
            for stream in modes:
                for count in clients:
                    print(f"bench-openai: {server}, stream {stream}, {count} clients", flush=True)
                    measured = load(sender(url, stream), count, count * args.requests_per_client, process.pid)
                    measured["characters_per_sec"] = measured["answered"] * args.tokens / measured["wall_s"]
                    runs.append({"server": server, "stream": stream, **measured})
        finally:
            process.terminate()
            process.wait(timeout=30)
    return runs


def report(results: dict[str, Any]) -> str:
    info, runs, batch_64 = results["machine"], results["runs"], results["batch_64_chars_per_sec"]
    lines = [
        f"# lstm-textgen serve against mlflow models serve ({results['date']})",
        "",
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; `{results['model']}`, one server "
        f"worker each on 127.0.0.1, the clients' threads on the same machine; each client sends "
        f"{results['requests_per_client']} single-row requests of {results['tokens']} new characters, "
        "one after another; `make bench-serving`.",
        "",
        "| server | stream | clients | generated characters/s | requests/s | p50 | p99 | first token p50 | "
        "first token p99 | refused | server CPU | clients' CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        refused = ", ".join(f"{n} x {code}" for code, n in r["refused"].items()) or "none"
        lines.append(
            f"| {r['server']} | {'yes' if r['stream'] else 'no'} | {r['clients']} | "
            f"{r['characters_per_sec']:,.0f} | {r['requests_per_sec']:.1f} | "
            f"{r['p50_s'] * 1000:.0f} ms | {r['p99_s'] * 1000:.0f} ms | "
            f"{r['ttft_p50_s'] * 1000:.0f} ms | {r['ttft_p99_s'] * 1000:.0f} ms | {refused} | "
            f"{r['server_cpu_share']:.2f} cores | {r['client_cpu_share']:.2f} cores |"
        )
    pick = {(r["server"], r["stream"], r["clients"]): r for r in runs}
    lines.append("")
    lines.append(f"The generation path without a server, 64 rows at once: {batch_64:,.0f} characters/s.")
    for server in ("lstm-textgen serve", "mlflow models serve"):
        if (row := pick.get((server, False, 64))) is not None:
            share = row["characters_per_sec"] / batch_64
            lines.append(f"- {server}, 64 clients: **{share:.0%}** of it (goal ≥ {GOAL_64:.0%}).")
    if (row := pick.get(("lstm-textgen serve", True, 16))) is not None:
        lines.append(
            f"- lstm-textgen serve, 16 streaming clients: time to first token p99 "
            f"**{row['ttft_p99_s'] * 1000:.0f} ms** (goal < {GOAL_TTFT_P99_S * 1000:.0f} ms)."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.if_available and not model_registered(args.model):
        print(f"bench-openai: {args.model} is not registered (run `make repro` first); not measured")
        return
    from lstm_textgen.tracking.registry import load_source

    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    name = args.model.removeprefix("models:/").split("@")[0].split("/")[0]
    info = machine()
    loaded = load_source(args.model, "cpu")
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": info, "model": args.model}
    results |= {"requests_per_client": args.requests_per_client, "tokens": args.tokens}
    results["batch_64_chars_per_sec"] = generation_rate(loaded, 64, args.tokens)
    del loaded
    results["runs"] = measure(args, name)
    text = report(results)
    print(text)
    out = args.out or results_dir(info["kind"])
    write_text(out / "serving-openai.md", text)
    write_json(out / "serving-openai.json", results)


if __name__ == "__main__":
    main()

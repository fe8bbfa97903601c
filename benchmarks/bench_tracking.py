"""`make bench-tracking`: what logging to a tracking server costs training, and how the server answers
many clients. In one run, on one prepared corpus and the same params, three real train-stage runs:
logging to SQLite beside the repository, to `lstm-textgen server` (PostgreSQL, basic-auth), and to that
server while it is stopped for `--outage-s` seconds mid-run; then `--clients` processes logging to the
server at once, each call timed. Written to benchmarks/results/<machine>/tracking.md.

    python -m benchmarks.bench_tracking [--steps 2000] [--repeats 2] [--outage-s 20] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    free_port,
    machine,
    prepare_default_corpus,
    results_dir,
    train_stage_command,
)
from lstm_textgen.files import read_json, write_json, write_text
from lstm_textgen.tracking import server

# One client: `calls` synchronous logging calls of one point each to a run of its own; prints the
# seconds each took, as JSON.
CLIENT = """
import json, sys, time
import mlflow
client = mlflow.MlflowClient()
experiment = client.get_experiment_by_name("lstm-textgen").experiment_id
run_id = client.create_run(experiment, run_name=sys.argv[2]).info.run_id
start = float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
seconds = []
for step in range(int(sys.argv[1])):
    began = time.perf_counter()
    client.log_metric(run_id, "val_loss", 1.0 / (step + 1), step=step)
    seconds.append(time.perf_counter() - began)
client.set_terminated(run_id)
print(json.dumps(seconds))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2, help="runs per store, interleaved")
    parser.add_argument("--eval-every", type=int, default=25, help="a logged evaluation every N steps")
    parser.add_argument("--outage-s", type=float, default=20.0, help="the server stopped this long mid-run")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200, help="logging calls per client")
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def prepare(workdir: Path, steps: int, eval_every: int) -> Path:
    raw = prepare_default_corpus(workdir)
    raw["train"].update(
        max_steps=steps, eval_every=eval_every, eval_batches=2, warmup_steps=min(100, steps // 4)
    )
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    return workdir / "params.yaml"


def train(workdir: Path, name: str, env: dict[str, str], lab: Path | None, outage_s: float) -> dict[str, Any]:
    """One train-stage run; with `lab`, its server is stopped for `outage_s` after the first evaluation."""
    out = workdir / name
    cmd = train_stage_command(workdir, workdir / "params.yaml", out)
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if lab is not None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("step "):
                break
        server.stop(lab)
        time.sleep(outage_s)
        server.start(lab, server.Transport(port=int(env["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])))
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"bench-tracking: the {name} run failed:\n{err[-3000:]}")
    metrics = read_json(out / "metrics" / "train.json")
    return {
        "store": name,
        "tokens_per_sec": metrics["tokens_per_sec"],
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": time.perf_counter() - started,
        "kept_for_later": "kept in" in err,
    }


def concurrent_clients(env: dict[str, str], clients: int, calls: int) -> dict[str, Any]:
    start = time.time() + 8  # after every client has imported mlflow
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(calls), f"client-{i}", str(start)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(clients)
    ]
    per_client: list[list[float]] = []
    for process in processes:
        out, err = process.communicate(timeout=900)
        if process.returncode != 0:
            raise SystemExit(f"bench-tracking: a client failed:\n{err[-2000:]}")
        per_client.append(json.loads(out.strip().splitlines()[-1]))
    ordered = sorted(second for seconds in per_client for second in seconds)
    return {
        "clients": clients,
        "calls": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
        # the clients ran side by side: all the calls over the slowest client's time
        "calls_per_s": len(ordered) / max(sum(seconds) for seconds in per_client),
    }


def summarise(runs: list[dict[str, Any]], outage_s: float) -> list[dict[str, Any]]:
    """One row per store: the mean of its runs."""
    rows = []
    for store in dict.fromkeys(r["store"] for r in runs):
        mine = [r for r in runs if r["store"] == store]
        row = {
            key: statistics.mean(r[key] for r in mine)
            for key in ("tokens_per_sec", "train_seconds", "wall_seconds")
        }
        label = f"{store} {outage_s:.0f} s" if "outage" in store else store
        rows.append(
            row
            | {"store": label, "runs": len(mine), "kept_for_later": any(r["kept_for_later"] for r in mine)}
        )
    return rows


def report(results: dict[str, Any]) -> str:
    runs, info, load = results["runs"], results["machine"], results["clients"]
    base = runs[0]["tokens_per_sec"]
    lines = [
        f"# Logging to a tracking server ({results['date']})",
        "",
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; the default model, "
        f"{results['steps']} steps, an evaluation logged every {results['eval_every']} steps, "
        f"`make bench-tracking`. Each row is a real train-stage run on the same prepared corpus; the "
        f"server is `lstm-textgen server` (PostgreSQL, basic-auth) on this machine, sharing its cores.",
        "",
        "| logging to | runs | tokens/s (mean) | vs SQLite | training s | wall s | points kept for later |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['store']} | {r['runs']} | {r['tokens_per_sec']:,.0f} | "
            f"{r['tokens_per_sec'] / base:.3f}x | {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} | "
            f"{'yes' if r['kept_for_later'] else 'no'} |"
        )
    lines += [
        "",
        f"{load['clients']} clients logging at once, {load['calls']} synchronous calls of one point each: "
        f"p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms per call, about "
        f"{load['calls_per_s']:.0f} calls/s in all.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "steps": args.steps,
        "eval_every": args.eval_every,
        "outage_s": args.outage_s,
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-tracking-", dir="/tmp"))
    workdir.chmod(0o755)  # PostgreSQL runs as the `postgres` user
    password = secrets.token_urlsafe(16)
    os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
    lab, port = workdir / "server", free_port()
    try:
        prepare(workdir, args.steps, args.eval_every)
        state = server.start(lab, server.Transport(port=port))
        remote = {**os.environ, "MLFLOW_TRACKING_URI": state.uri}
        remote |= {"MLFLOW_TRACKING_USERNAME": server.ADMIN, "MLFLOW_TRACKING_PASSWORD": password}
        local = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
        runs = []
        # interleaved, so that a machine warming up or a neighbour's load falls on both alike
        setups = [("SQLite", local, None), ("server", remote, None)] * args.repeats
        for i, (name, env, outage) in enumerate([*setups, ("server, outage", remote, lab)]):
            print(f"bench-tracking: training, logging to {name} ...", flush=True)
            runs.append(train(workdir, f"run-{i}", env, outage, args.outage_s) | {"store": name})
        results["runs"] = summarise(runs, args.outage_s)
        print(f"bench-tracking: {args.clients} clients at once ...", flush=True)
        results["clients"] = concurrent_clients(remote, args.clients, args.calls)
    finally:
        if (lab / "server.json").exists():
            server.stop(lab)
    text = report(results)
    print(text)
    out = args.out or results_dir(results["machine"]["kind"])
    write_text(out / "tracking.md", text)
    write_json(out / "tracking.json", results)


if __name__ == "__main__":
    main()

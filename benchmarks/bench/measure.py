"""The five measurements. Each runs lstm-textgen and, where there is one, the notebook's approach in the
same process, one after the other, so their ratio holds on a noisy shared machine."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import notebook_baseline as notebook
from benchmarks.common import GPU_TARGET_LOSS, REPO
from lstm_textgen.apps.presets import load_presets
from lstm_textgen.data.tokenisers import Vocabulary
from lstm_textgen.devices import resolve_device, resolve_dtype
from lstm_textgen.inference.evaluation import evaluate_stateful
from lstm_textgen.inference.generation import generate
from lstm_textgen.model.checkpoint import load_model
from lstm_textgen.params import Params, Sampling, parse_params, with_settings
from lstm_textgen.train.loop import train
from lstm_textgen.train.setup import new_train_state
from lstm_textgen.train.step import train_step


def median_spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# 1. Prepare: each approach in a fresh process, for an honest peak memory


def measure_prepare(corpus: Path, repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind in ("ours", "notebook"):
        runs = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench.prepare_child", kind, str(corpus)],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[kind] = {key: median_spread([r[key] for r in runs]) for key in runs[0]}
    return results


# 2. Training throughput: useful next-token predictions per second (the library's own train_step)


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
        run_params = params.model_copy(update={"train": tp.model_copy(update={"seed": repeat})})
        state = new_train_state(splits["train"], vocab_size, run_params, device=device, dtype=dtype)
        state.model.train()

        def our_step() -> None:
            train_step(state, state.model, tp.lr, tp, dtype)

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


# 3. Quality per second: validation loss over the whole validation split against training time


def measure_quality(
    splits: dict[str, np.ndarray],
    vocab: Vocabulary,
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
    ep = params.evaluate  # the evaluate stage's windowing, so the figure compares with the pipeline's
    full = evaluate_stateful(
        loaded.model,
        splits["val"],
        ep.seq_len,
        ep.batch_size,
        resolve_dtype(tp.dtype, loaded.model.head.weight.device),
    )
    curve = [(h["train_seconds"], h["val_loss"]) for h in result.history]
    return {
        "steps": result.steps,
        "budget_s": result.train_seconds if max_steps else budget_s,
        "train_seconds": result.train_seconds,
        "curve": curve,
        # the budget stops the run, so every evaluation is within it (the last one ends it, a step late)
        "val_loss_at_budget": min((loss for _, loss in curve), default=math.nan),
        "best_val_loss": result.window_val_loss_best,
        "stateful_full_split_val_loss": full["loss"],
        "checkpoint": str(workdir / "best.pt"),
        "params": {k: raw[k] for k in ("model", "train")} | {"data.seq_len": seq_len},
    }


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
            generate(loaded.model, [prompt] * batch, ours_len, Sampling(seed=repeat))
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


# 5. GPU (when present)


def measure_gpu(splits, vocab, params: Params, workdir: Path) -> dict[str, Any] | None:
    """The `gpu-shakespeare` preset (presets.yaml) on the CUDA device: throughput and the training
    seconds until the validation loss first reaches GPU_TARGET_LOSS. None without a GPU."""
    if not torch.cuda.is_available():
        return None
    preset = with_settings(params, load_presets(REPO / "presets.yaml")["gpu-shakespeare"])
    val_windows = math.ceil((len(splits["val"]) - 1) / params.data.seq_len)
    run_params = with_settings(
        preset,
        {
            "train.device": "cuda",
            "train.eval_every": 50,
            "train.eval_batches": math.ceil(val_windows / preset.train.batch_size),
            "train.max_minutes": 5,
        },
    )
    raw = run_params.model_dump()
    result = train(splits, vocab, run_params, workdir / "gpu-best.pt", workdir / "gpu-last.pt")
    reached = next((h["train_seconds"] for h in result.history if h["val_loss"] <= GPU_TARGET_LOSS), None)
    return {
        "device": torch.cuda.get_device_name(0),
        "dtype": result.dtype,
        "tokens_per_sec": result.tokens_per_sec,
        "seconds_to_target": reached,
        "best_val_loss": result.window_val_loss_best,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "params": {k: raw[k] for k in ("model", "train")},
    }

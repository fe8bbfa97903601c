"""`make gpu-check`: everything GPU-specific in one run of under 10 minutes on one GPU, written to
benchmarks/results/<machine kind>/report.md and results.json, both rewritten after every check (a
crash or a lost machine keeps what was measured; a check that fails is recorded and the next runs):

1. precision: what the LSTM/GRU really compute in under bf16 and fp16 autocast, and loss scaling;
2. training throughput of the default params and of the `gpu-shakespeare` preset, after a warm-up;
3. training seconds until the periodic validation loss reaches 1.50 (the preset);
4. DDP with one process on NCCL against plain training (same weights?);
5. a stopped-and-resumed run against a straight one, without and with dropout between layers;
6. generation: the single-step kernel (`Stepper`) against the sequence kernel, TF32 off, by text and
   by logits;
7. the CUDA-trained checkpoint loaded and generating on the CPU, as a CPU server would.

Without a CUDA device every check still runs, in miniature and on the CPU (so the command is tested
where CI runs), and the report says plainly that no GPU figure is measured. Offline by default: the
embedded corpus (`shakespeare`), or `--corpus PATH`.

    python -m benchmarks.gpu_check --out benchmarks/results/my-gpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import GPU_TARGET_LOSS, REPO, free_port, load_corpus, machine, results_dir
from lstm_textgen.apps.presets import load_presets
from lstm_textgen.data.dataset import Dataset
from lstm_textgen.data.preparation import build_dataset
from lstm_textgen.devices import dtype_name, needs_loss_scaling, recurrent_dtype, resolve_device
from lstm_textgen.files import write_text
from lstm_textgen.inference.batcher import warm_up
from lstm_textgen.inference.generation import generate
from lstm_textgen.model.checkpoint import load_checkpoint, load_model
from lstm_textgen.model.stepper import Stepper
from lstm_textgen.params import Params, Sampling, load_params, with_settings
from lstm_textgen.train.distributed import World
from lstm_textgen.train.loop import train
from lstm_textgen.train.setup import TrainResult

# the generation kernels' logits may differ by float rounding only (fp32, TF32 off)
LOGIT_TOLERANCE = 1e-3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="shakespeare", help="a key of params.yaml's corpora, or a path")
    parser.add_argument("--out", type=Path, help="default on a GPU: benchmarks/results/<machine kind>/")
    parser.add_argument("--minutes", type=float, default=3.0, help="budget of the time-to-1.50 run")
    return parser.parse_args()


def run(dataset: Dataset, params: Params, workdir: Path, name: str, **kwargs: Any) -> TrainResult:
    return train(
        dataset.splits, dataset.vocab, params, workdir / f"{name}-best.pt", workdir / f"{name}.pt", **kwargs
    )


def weight_difference(a: Path, b: Path) -> float:
    left, right = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return max((left[k].float() - right[k].float()).abs().max().item() for k in left)


def precision(device: torch.device) -> dict[str, Any]:
    """What autocast really does to the recurrent layers here (CUDA runs cuDNN's RNNs in float16
    whatever the autocast dtype), and whether the loss is scaled for it."""
    facts: dict[str, Any] = {}
    for cell in ("lstm", "gru"):
        for dtype in (torch.bfloat16, torch.float16):
            key = f"{cell}_{dtype_name(dtype)}"
            try:
                ran = recurrent_dtype(device, dtype, cell)
            except RuntimeError as error:  # a CPU kind without this dtype's RNN kernel: say so
                facts[key] = {"ran": False, "error": str(error).splitlines()[0][:200]}
                continue
            facts[key] = {
                "ran": True,
                "recurrent_dtype": dtype_name(ran),
                "loss_scaled": needs_loss_scaling(dtype, ran),
            }
    return facts


def precision_cell(fact: dict[str, Any]) -> str:
    if not fact.get("ran", True):
        return "no kernel here"
    return f"{fact['recurrent_dtype']}{' (scaled)' if fact['loss_scaled'] else ''}"


def throughput(dataset: Dataset, params: Params, workdir: Path, steps: int) -> dict[str, Any]:
    """Tokens per second of `steps` steps, after a warm-up run of its own (CUDA's start-up, cuDNN's
    plans and the allocator's first blocks are not training speed)."""
    warm = max(10, steps // 10)
    settings = {"train.eval_every": 10**6, "train.eval_batches": 1}
    run(dataset, with_settings(params, {**settings, "train.max_steps": warm}), workdir, "warm-up")
    result = run(
        dataset, with_settings(params, {**settings, "train.max_steps": steps}), workdir, "throughput"
    )
    return {"tokens_per_sec": result.tokens_per_sec, "dtype": result.precision(), "steps": steps}


def time_to_target(dataset: Dataset, params: Params, workdir: Path, minutes: float) -> dict[str, Any]:
    timed = with_settings(params, {"train.max_minutes": minutes, "train.eval_every": 50})
    result = run(dataset, timed, workdir, "target")
    reached = next((h["train_seconds"] for h in result.history if h["val_loss"] <= GPU_TARGET_LOSS), None)
    return {
        "seconds_to_target": reached,
        "best_val_loss": result.window_val_loss_best,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "dtype": result.precision(),
        "checkpoint": str(workdir / "target-best.pt"),
    }


def ddp_one_process(dataset: Dataset, params: Params, workdir: Path, device: torch.device) -> dict[str, Any]:
    """The distributed code path (process group, DDP wrapper, collectives) as torchrun would start
    a world of one, in this process."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    env |= {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    os.environ.update(env)
    try:
        world = World.from_env()
        world.start(device)
        try:
            ddp = run(dataset, params, workdir, "ddp", world=world)
        finally:
            world.stop()
    finally:
        for key in env:
            os.environ.pop(key, None)
    plain = run(dataset, params, workdir, "plain")
    return {
        "backend": world.backend(device),
        "max_weight_difference": weight_difference(workdir / "ddp.pt", workdir / "plain.pt"),
        "tokens_per_sec_ddp": ddp.tokens_per_sec,
        "tokens_per_sec_plain": plain.tokens_per_sec,
    }


def resume_difference(dataset: Dataset, params: Params, workdir: Path, name: str) -> float:
    half = params.train.max_steps // 2
    params = with_settings(params, {"train.eval_every": half})
    run(dataset, params, workdir, f"{name}-straight")
    run(
        dataset, params, workdir, f"{name}-resumed", on_eval=lambda record: True
    )  # stop at the first evaluation
    run(dataset, with_settings(params, {"train.resume": True}), workdir, f"{name}-resumed")
    return weight_difference(workdir / f"{name}-straight.pt", workdir / f"{name}-resumed.pt")


def resume_equality(dataset: Dataset, params: Params, workdir: Path) -> dict[str, Any]:
    """A resumed run against a straight one, without dropout and with dropout between two layers (on
    CUDA, cuDNN reseeds its dropout state after the RNG is restored: measured, not assumed)."""
    with_dropout = with_settings(params, {"model.dropout": 0.2, "model.layers": 2})
    return {
        "steps": params.train.max_steps,
        "stopped_at": params.train.max_steps // 2,
        "max_weight_difference": resume_difference(dataset, params, workdir, "plain"),
        "max_weight_difference_with_dropout": resume_difference(dataset, with_dropout, workdir, "dropout"),
    }


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off: cuDNN allows it by default, cuBLAS not, so the two kernels would differ by design."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def generation_kernels(checkpoint: Path, device: torch.device, tokens: int) -> dict[str, Any]:
    """Greedy text from the same prompt by the single-step kernel and by the sequence kernel fed one
    token at a time (TF32 off): the same text, logits within LOGIT_TOLERANCE, the time per token."""
    loaded = load_model(checkpoint, device)
    prompt = [[int(i) for i in loaded.vocab.encode("ROMEO:")]]
    greedy = Sampling(strategy="greedy")
    with exact_float32():
        generate(loaded.model, prompt, 8, greedy)  # warm-up
        started = time.perf_counter()
        by_step = generate(loaded.model, prompt, tokens, greedy)[0]
        step_s = time.perf_counter() - started
        started = time.perf_counter()
        with torch.inference_mode():
            logits, state = warm_up(loaded.model, prompt, device)
            stepper, by_sequence, difference = Stepper(loaded.model, state), [], 0.0
            step_logits = logits
            for _ in range(tokens):
                token = logits.argmax(-1)
                by_sequence.append(int(token[0]))
                difference = max(difference, (step_logits.float() - logits.float()).abs().max().item())
                logits, state = loaded.model(token[:, None], state, last_only=True)
                step_logits = stepper(token)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sequence_s = time.perf_counter() - started
    return {
        "tokens": tokens,
        "same_text": by_step == by_sequence,
        "max_logit_difference": difference,
        "logits_within_tolerance": difference <= LOGIT_TOLERANCE,
        "ms_per_token_step_kernel": 1000 * step_s / tokens,
        "ms_per_token_sequence_kernel": 1000 * sequence_s / tokens,
    }


def served_on_cpu(checkpoint: Path) -> dict[str, Any]:
    """What `mlflow models serve` on a CPU machine does with a model trained on the GPU."""
    loaded = load_model(checkpoint, "cpu")
    ids = loaded.vocab.encode("ROMEO:")
    text = loaded.vocab.decode(generate(loaded.model, [ids], 40, Sampling(seed=1))[0])
    return {"trained_on": loaded.checkpoint["device"], "generated_characters": len(text), "text": text}


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def checks(
    args: argparse.Namespace, workdir: Path, results: dict[str, Any]
) -> Iterator[tuple[str, Callable]]:
    """(name, check) in order; on the CPU with tiny models, few steps and a small slice of the corpus."""
    on_gpu = results["gpu"] is not None
    device = resolve_device("cuda" if on_gpu else "cpu")
    base = with_settings(load_params(REPO / "params.yaml"), {"train.device": device.type})
    text = load_corpus(args.corpus, base, workdir)[: None if on_gpu else 100_000]
    results["characters"] = len(text)
    dataset = build_dataset(text, base.data.model_copy(update={"val_fraction": 0.1, "test_fraction": 0.0}))
    preset = with_settings(base, load_presets(REPO / "presets.yaml")["gpu-shakespeare"])
    small = {"model.hidden": 32, "model.embedding_dim": 16, "model.layers": 1, "train.batch_size": 8}
    if not on_gpu:
        preset = with_settings(preset, {**small, "data.seq_len": 32, "train.eval_batches": 2})
    steps = 300 if on_gpu else 4
    short = with_settings(preset, {"train.max_steps": 2 * steps if on_gpu else 8, "train.eval_every": 1000})
    target = workdir / "target-best.pt"
    yield "precision", lambda: precision(device)
    yield (
        "throughput",
        lambda: {
            "default": throughput(dataset, with_settings(base, {} if on_gpu else small), workdir, steps),
            "gpu-shakespeare": throughput(dataset, preset, workdir, steps),
        },
    )
    yield "target", lambda: time_to_target(dataset, preset, workdir, args.minutes if on_gpu else 0.02)
    yield "ddp", lambda: ddp_one_process(dataset, short, workdir, device)
    yield "resume", lambda: resume_equality(dataset, short, workdir)
    yield "generation", lambda: generation_kernels(target, device, 500 if on_gpu else 20)
    yield "cpu_serving", lambda: served_on_cpu(target)


def check_all(
    args: argparse.Namespace, workdir: Path, save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Every check in turn, `save`d after each; a failing check is recorded with its error."""
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": gpu_name(),
        "machine": machine()["kind"],
        "torch": torch.__version__,
        "corpus": args.corpus,
        "seconds": {},
    }
    for name, check in checks(args, workdir, results):
        print(f"gpu-check: {name} ...", flush=True)
        started = time.monotonic()
        try:
            results[name] = check()
        except Exception as exc:  # record it and go on: GPU minutes are scarce
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        results["seconds"][name] = round(time.monotonic() - started, 1)
        save(results)
    return results


def row(
    results: dict[str, Any], name: str, label: str, text: Callable[[dict[str, Any]], str]
) -> tuple[str, str]:
    found = results.get(name)
    if found is None:
        return label, "not run"
    return label, f"**failed**: {found['error']}" if "error" in found else text(found)


def report(results: dict[str, Any]) -> str:
    gpu = results["gpu"]
    head = (
        f"# GPU check: {gpu} ({results['date']})\n\ntorch {results['torch']}, corpus {results['corpus']} "
        f"({results.get('characters', 0):,} characters), `make gpu-check`.\n"
        if gpu
        else "# GPU check: no GPU figures are measured yet\n\nThis machine has no CUDA device. Every check "
        "below ran in miniature on the CPU (tiny model, a few steps) to show that the command works; "
        "none of its figures describes a GPU. Run `make gpu-check` on a machine with one.\n"
    )
    rows = [
        row(
            results,
            "precision",
            "recurrent layers under autocast (cell_autocast: ran in, loss scaled)",
            lambda p: ", ".join(f"{k}: {precision_cell(v)}" for k, v in p.items()),
        ),
        row(
            results,
            "throughput",
            "training, default params / `gpu-shakespeare`, after a warm-up",
            lambda t: (
                f"{t['default']['tokens_per_sec']:,.0f} tokens/s ({t['default']['dtype']}) / "
                f"{t['gpu-shakespeare']['tokens_per_sec']:,.0f} ({t['gpu-shakespeare']['dtype']})"
            ),
        ),
        row(
            results,
            "target",
            f"validation loss {GPU_TARGET_LOSS} (`gpu-shakespeare`)",
            lambda t: (
                (
                    f"after {t['seconds_to_target']:.1f} s"
                    if t["seconds_to_target"] is not None
                    else "not reached"
                )
                + f"; best {t['best_val_loss']:.4f} in {t['steps']} steps, {t['train_seconds']:.0f} s"
            ),
        ),
        row(
            results,
            "ddp",
            "DDP, 1 process vs plain",
            lambda d: (
                f"{d['backend']}: max weight difference {d['max_weight_difference']:.3g}; "
                f"{d['tokens_per_sec_ddp']:,.0f} vs {d['tokens_per_sec_plain']:,.0f} tokens/s"
            ),
        ),
        row(
            results,
            "resume",
            "stopped halfway and resumed vs straight: without / with dropout",
            lambda r: (
                f"max weight difference {r['max_weight_difference']:.3g} / "
                f"{r['max_weight_difference_with_dropout']:.3g}"
            ),
        ),
        row(
            results,
            "generation",
            "generation, step kernel vs sequence kernel (TF32 off)",
            lambda g: (
                f"same text: {g['same_text']}; "
                f"logits within {LOGIT_TOLERANCE}: {g['logits_within_tolerance']} "
                f"(max {g['max_logit_difference']:.2g}); {g['ms_per_token_step_kernel']:.3f} vs "
                f"{g['ms_per_token_sequence_kernel']:.3f} ms/token"
            ),
        ),
        row(
            results,
            "cpu_serving",
            "the GPU-trained checkpoint generating on the CPU",
            lambda s: f"trained on {s['trained_on']}: {s['generated_characters']} characters",
        ),
    ]
    lines = ["| check | result |", "|---|---|", *(f"| {check} | {result} |" for check, result in rows)]
    return head + "\n" + "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    out = args.out or (results_dir(machine()["kind"]) if gpu_name() else None)

    def save(results: dict[str, Any]) -> None:
        if out is not None:
            write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
            write_text(out / "report.md", report(results))

    with tempfile.TemporaryDirectory() as tmp:
        results = check_all(args, Path(tmp), save)
    print(report(results))


if __name__ == "__main__":
    main()

"""`make gpu-check`: everything GPU-specific in one run of under 10 minutes on one GPU, written to
benchmarks/results/<machine kind>/report.md (and results.json):

1. bf16 training throughput of the default params and of the `gpu-shakespeare` preset;
2. training seconds until the periodic validation loss reaches 1.50 (Tiny Shakespeare, the preset);
3. DDP with one process on NCCL against plain training (same weights?);
4. a stopped-and-resumed run against a straight one (bit for bit on CUDA?);
5. generation: the single-step kernel (`Stepper`) against the sequence kernel, one token at a time;
6. the CUDA-trained checkpoint loaded and generating on the CPU, as a CPU server would.

Without a CUDA device every check still runs, in miniature and on the CPU (so the command is tested
where CI runs), and the report says plainly that no GPU figure is measured.

    python -m benchmarks.gpu_check --corpus ../shared/corpora/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import GPU_TARGET_LOSS, REPO, free_port, load_corpus, machine, results_dir
from lstm_textgen.apps.presets import load_presets
from lstm_textgen.data.dataset import Dataset
from lstm_textgen.data.preparation import build_dataset
from lstm_textgen.files import write_text
from lstm_textgen.inference.generation import generate, warm_up
from lstm_textgen.model.checkpoint import load_checkpoint, load_model
from lstm_textgen.params import Params, Sampling, load_params, with_settings
from lstm_textgen.train.distributed import World
from lstm_textgen.train.loop import TrainResult, train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus", default="tinyshakespeare", help="a key of params.yaml's corpora, or a path"
    )
    parser.add_argument(
        "--out", type=Path, help="default: benchmarks/results/<machine kind>/ (CPU: print only)"
    )
    parser.add_argument("--minutes", type=float, default=4.0, help="budget of the time-to-1.50 run")
    return parser.parse_args()


def run(dataset: Dataset, params: Params, workdir: Path, name: str, **kwargs: Any) -> TrainResult:
    return train(
        dataset.splits, dataset.vocab, params, workdir / f"{name}-best.pt", workdir / f"{name}.pt", **kwargs
    )


def weight_difference(a: Path, b: Path) -> float:
    left, right = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return max((left[k].float() - right[k].float()).abs().max().item() for k in left)


def throughput(dataset: Dataset, params: Params, workdir: Path, steps: int) -> dict[str, Any]:
    short = with_settings(
        params, {"train.max_steps": steps, "train.eval_every": steps, "train.eval_batches": 1}
    )
    result = run(dataset, short, workdir, "throughput")
    return {"tokens_per_sec": result.tokens_per_sec, "dtype": result.dtype, "steps": steps}


def time_to_target(dataset: Dataset, params: Params, workdir: Path, minutes: float) -> dict[str, Any]:
    timed = with_settings(params, {"train.max_minutes": minutes, "train.eval_every": 50})
    result = run(dataset, timed, workdir, "target")
    reached = next((h["train_seconds"] for h in result.history if h["val_loss"] <= GPU_TARGET_LOSS), None)
    return {
        "seconds_to_target": reached,
        "best_val_loss": result.window_val_loss_best,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
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


def resume_equality(dataset: Dataset, params: Params, workdir: Path) -> dict[str, Any]:
    half = params.train.max_steps // 2
    params = with_settings(params, {"train.eval_every": half})
    run(dataset, params, workdir, "straight")
    run(dataset, params, workdir, "resumed", on_eval=lambda record: True)  # stop at the first evaluation
    run(dataset, with_settings(params, {"train.resume": True}), workdir, "resumed")
    difference = weight_difference(workdir / "straight.pt", workdir / "resumed.pt")
    return {"steps": params.train.max_steps, "stopped_at": half, "max_weight_difference": difference}


def generation_kernels(checkpoint: Path, device: torch.device, tokens: int) -> dict[str, Any]:
    """Greedy text from the same prompt by the single-step kernel and by the sequence kernel fed one
    token at a time: the same text, and the time per token of each."""
    loaded = load_model(checkpoint, device)
    prompt = [[loaded.vocab.encode("ROMEO:")[i] for i in range(6)]]
    greedy = Sampling(strategy="greedy")
    started = time.perf_counter()
    by_step = generate(loaded.model, prompt, tokens, greedy)[0]
    step_s = time.perf_counter() - started
    started = time.perf_counter()
    with torch.inference_mode():
        logits, state = warm_up(loaded.model, prompt, device)
        by_sequence = []
        for _ in range(tokens):
            token = logits.argmax(-1)
            by_sequence.append(int(token[0]))
            logits, state = loaded.model(token[:, None], state, last_only=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sequence_s = time.perf_counter() - started
    return {
        "tokens": tokens,
        "same_text": by_step == by_sequence,
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


def check_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Each check in turn; on the CPU with tiny models, few steps and a small slice of the corpus."""
    on_gpu = gpu_name() is not None
    device = torch.device("cuda" if on_gpu else "cpu")
    base = with_settings(load_params(REPO / "params.yaml"), {"train.device": device.type})
    text = load_corpus(args.corpus, base, workdir)[: None if on_gpu else 100_000]
    dataset = build_dataset(text, base.data.model_copy(update={"val_fraction": 0.1, "test_fraction": 0.0}))
    preset = with_settings(base, load_presets(REPO / "presets.yaml")["gpu-shakespeare"])
    small = {"model.hidden": 32, "model.embedding_dim": 16, "model.layers": 1, "train.batch_size": 8}
    if not on_gpu:
        preset = with_settings(preset, {**small, "data.seq_len": 32, "train.eval_batches": 2})
    steps = 300 if on_gpu else 4
    short = with_settings(preset, {"train.max_steps": 2 * steps if on_gpu else 8, "train.eval_every": 1000})
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "corpus": args.corpus,
        "characters": len(text),
    }
    print("gpu-check: throughput ...", flush=True)
    results["throughput"] = {
        "default": throughput(dataset, with_settings(base, {} if on_gpu else small), workdir, steps),
        "gpu-shakespeare": throughput(dataset, preset, workdir, steps),
    }
    print("gpu-check: time to the target loss ...", flush=True)
    results["target"] = time_to_target(dataset, preset, workdir, args.minutes if on_gpu else 0.02)
    print("gpu-check: DDP, one process ...", flush=True)
    results["ddp"] = ddp_one_process(dataset, short, workdir, device)
    print("gpu-check: resume ...", flush=True)
    results["resume"] = resume_equality(dataset, short, workdir)
    checkpoint = Path(results["target"].pop("checkpoint"))
    print("gpu-check: generation kernels, CPU serving ...", flush=True)
    results["generation"] = generation_kernels(checkpoint, device, 500 if on_gpu else 20)
    results["cpu_serving"] = served_on_cpu(checkpoint)
    return results


def report(results: dict[str, Any]) -> str:
    gpu = results["gpu"]
    head = (
        f"# GPU check: {gpu} ({results['date']})\n\ntorch {results['torch']}, corpus {results['corpus']} "
        f"({results['characters']:,} characters), `make gpu-check`.\n"
        if gpu
        else "# GPU check: no GPU figures are measured yet\n\nThis machine has no CUDA device. Every check "
        "below ran in miniature on the CPU (tiny model, a few steps) to show that the command works; "
        "none of its figures describes a GPU. Run `make gpu-check` on a machine with one.\n"
    )
    t, target, ddp, resume = results["throughput"], results["target"], results["ddp"], results["resume"]
    gen, serve = results["generation"], results["cpu_serving"]
    reached = target["seconds_to_target"]
    when = f"after {reached:.1f} s of training" if reached is not None else "not reached"
    rows = [
        (
            f"training, default params ({t['default']['dtype']})",
            f"{t['default']['tokens_per_sec']:,.0f} tokens/s",
        ),
        (
            f"training, `gpu-shakespeare` ({t['gpu-shakespeare']['dtype']})",
            f"{t['gpu-shakespeare']['tokens_per_sec']:,.0f} tokens/s",
        ),
        (
            f"validation loss {GPU_TARGET_LOSS} (`gpu-shakespeare`)",
            f"{when}; best {target['best_val_loss']:.4f} in {target['steps']} steps, "
            f"{target['train_seconds']:.0f} s",
        ),
        (
            f"DDP, 1 process on {ddp['backend']} vs plain",
            f"max weight difference {ddp['max_weight_difference']:.3g}; "
            f"{ddp['tokens_per_sec_ddp']:,.0f} vs {ddp['tokens_per_sec_plain']:,.0f} tokens/s",
        ),
        (
            f"resume at step {resume['stopped_at']} of {resume['steps']} vs straight",
            f"max weight difference {resume['max_weight_difference']:.3g}",
        ),
        (
            f"generation, {gen['tokens']} tokens: step kernel vs sequence kernel",
            f"same text: {gen['same_text']}; {gen['ms_per_token_step_kernel']:.3f} vs "
            f"{gen['ms_per_token_sequence_kernel']:.3f} ms/token",
        ),
        (
            f"checkpoint trained on {serve['trained_on']}, generating on the CPU",
            f"{serve['generated_characters']} characters",
        ),
    ]
    lines = ["| check | result |", "|---|---|", *(f"| {check} | {result} |" for check, result in rows)]
    return head + "\n" + "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = check_all(args, Path(tmp))
    text = report(results)
    print(text)
    out = args.out
    if out is None and results["gpu"]:
        out = results_dir(machine()["kind"])
    if out is not None:
        write_text(out / "report.md", text)
        write_text(out / "results.json", json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

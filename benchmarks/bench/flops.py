"""Model FLOP utilisation: the training FLOP/s of a model over the matrix-multiply peak measured on
the same machine in the same run (nanoGPT reports MFU the same way, against a datasheet peak)."""

from __future__ import annotations

import time

import torch

from lstm_textgen.params import ModelParams

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def training_flops_per_token(params: ModelParams, vocab_size: int) -> float:
    """Matrix-multiply FLOPs per training token: forward 2 per multiply-add, backward twice that.
    Per layer `gates * hidden * (input + hidden)` multiply-adds, plus the head's `hidden * vocab`."""
    input_size = {"embedding": params.embedding_dim, "onehot": vocab_size, "scalar": 1}[params.input]
    gates, hidden = GATES[params.cell], params.hidden
    recurrent = sum(
        gates * hidden * ((input_size if layer == 0 else hidden) + hidden) for layer in range(params.layers)
    )
    return 6.0 * (recurrent + hidden * vocab_size)


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of a square matrix product over `repeats` timed batches: the machine's practical peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    calls = 4 if device.type == "cpu" else 50
    best = 0.0
    for _ in range(repeats + 1):  # the first batch warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, calls * 2 * size**3 / (time.perf_counter() - start))
    return best


def model_flop_utilisation(
    tokens_per_s: float, params: ModelParams, vocab_size: int, dtype: torch.dtype, device: torch.device
) -> dict[str, float]:
    per_token = training_flops_per_token(params, vocab_size)
    peak = matmul_peak_flops(dtype, device)
    achieved = tokens_per_s * per_token
    return {
        "flops_per_token": per_token,
        "achieved_flops": achieved,
        "peak_flops": peak,
        "mfu": achieved / peak,
    }

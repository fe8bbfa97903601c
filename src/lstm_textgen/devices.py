"""Where tensors live and in which precision: device choice, autocast dtype, the CPU's bf16 support,
token arrays moved to the device once. Shared by training, evaluation, sampling and the benchmark."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lstm_textgen.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(UserError):
    """The requested device or precision is not available here; the message names the key."""


def resolve_device(preference: str) -> torch.device:
    """`train.device`: auto picks CUDA, then Apple MPS, then the CPU. An accelerator comes with its
    index (`cuda:0`), as the tensors placed there report it, so that comparing a tensor's device with
    this one says whether it is already there."""
    if preference == "auto":
        preference = (
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "train.device: cuda requested but no CUDA device is available (use auto or cpu)"
            )
        return torch.device("cuda", torch.cuda.current_device())
    if preference == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("train.device: mps requested but Apple MPS is not available (use auto or cpu)")
        return torch.device("mps", 0)
    return torch.device(preference)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`. From host memory to an accelerator the copy goes through pinned memory and
    does not block the host, so the CPU can queue the next steps while the GPU works; a tensor already
    there, or bound for the CPU, is not copied through pinned memory (only CPU tensors can be pinned)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type != "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs where bf16 autocast speeds up an LSTM instead of failing."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_dtype(preference: str, device: torch.device, cell: str = "lstm") -> torch.dtype:
    """Autocast dtype: bf16 where the device runs it natively, else float32. An explicit reduced
    precision on the CPU is tried once on a tiny `cell` first: oneDNN has no bf16/fp16 LSTM on CPUs
    without AVX-512 and fails deep inside the first forward pass with an opaque message."""
    if preference != "auto":
        dtype = DTYPES[preference]
        if device.type == "cpu" and dtype != torch.float32:
            _check_cpu_autocast(dtype, cell, preference)
        return dtype
    if device.type == "cuda":  # native bf16 only (Ampere and later), not the emulation of a V100 or T4
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def recurrent_layer(cell: str) -> type[torch.nn.RNNBase]:
    """torch's layer for a `model.cell` name: lstm -> nn.LSTM, gru -> nn.GRU, rnn -> nn.RNN."""
    return getattr(torch.nn, cell.upper())


def _check_cpu_autocast(dtype: torch.dtype, cell: str, name: str) -> None:
    probe = recurrent_layer(cell)(4, 8, num_layers=2, batch_first=True)
    try:
        with torch.autocast(device_type="cpu", dtype=dtype):
            outputs, _ = probe(torch.zeros(1, 2, 4, requires_grad=True))
        outputs.float().sum().backward()
    except RuntimeError as error:
        raise DeviceError(
            f"train.dtype: {name} does not run a {cell.upper()} on this CPU "
            f"(native bf16: {cpu_has_native_bf16()}; PyTorch said: {str(error).splitlines()[0][:120]}); "
            "use train.dtype auto or float32"
        ) from None


def recurrent_dtype(device: torch.device, dtype: torch.dtype, cell: str = "lstm") -> torch.dtype:
    """What the recurrent layers really compute in under `dtype`'s autocast on `device`, read off a
    tiny layer: CUDA's autocast runs cuDNN's LSTM/GRU/RNN in float16 whatever the autocast dtype (bf16
    included), the CPU's in the autocast dtype."""
    if dtype == torch.float32:
        return torch.float32
    with torch.random.fork_rng(devices=[]):  # the probe's random weights must not move torch's RNG
        probe = recurrent_layer(cell)(4, 8, batch_first=True).to(device)
    with torch.no_grad(), autocast(device, dtype):
        outputs, _ = probe(torch.zeros(1, 2, 4, device=device))
    return outputs.dtype


def needs_loss_scaling(dtype: torch.dtype, recurrent: torch.dtype) -> bool:
    """float16 anywhere in the step (the autocast dtype, or the recurrent layers CUDA runs in float16
    under bf16 autocast): its narrow range lets small gradients underflow to zero unless the loss is
    scaled."""
    return torch.float16 in (dtype, recurrent)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for the forward pass; float32 runs without autocast."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backend(device: torch.device, threads: int | None) -> None:
    """CPU threads: `train.threads`, else every core; a process that drives a GPU gets its share too
    (the launcher's per-process share), so that local workers do not oversubscribe the host."""
    torch.set_num_threads(threads or os.cpu_count() or 1)


def token_source(ids: np.ndarray, device: torch.device, share_of_free: float = 0.5) -> torch.Tensor:
    """Where training batches are gathered from, without a full in-memory copy of a split it can read
    from the memory map: on the CPU the map itself (the OS pages in what the windows touch); on a GPU
    a device copy when it takes at most `share_of_free` of the free memory, else the host map (the
    WindowBatcher gathers each batch there and copies it over through pinned memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if device_bytes(ids) <= share_of_free * free:
            return to_device_tokens(ids, device)
    with warnings.catch_warnings():  # a read-only map: nothing here ever writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(ids)


def device_bytes(ids: np.ndarray) -> int:
    """What `to_device_tokens` takes on the device: one byte a token for uint8 ids, else four (int32)."""
    return len(ids) * (1 if ids.dtype == np.uint8 else 4)


def to_device_tokens(ids: np.ndarray, device: torch.device, block: int = 1 << 24) -> torch.Tensor:
    """Move a split to the device once; uint8 stays uint8, wider ids become int32. To an accelerator
    it goes `block` tokens at a time, so the host never holds a converted copy of the whole split."""
    np_dtype = np.uint8 if ids.dtype == np.uint8 else np.int32
    if device.type == "cpu":
        return torch.from_numpy(np.array(ids, dtype=np_dtype, copy=True))
    out = torch.empty(len(ids), dtype=torch.uint8 if np_dtype == np.uint8 else torch.int32, device=device)
    for start in range(0, len(ids), block):
        piece = torch.from_numpy(np.array(ids[start : start + block], dtype=np_dtype, copy=True))
        out[start : start + len(piece)] = to_device(piece, device)
    return out

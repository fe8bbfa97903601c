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
    """`train.device`: auto picks CUDA, then Apple MPS, then the CPU."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise DeviceError("train.device: cuda requested but no CUDA device is available (use auto or cpu)")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("train.device: mps requested but Apple MPS is not available (use auto or cpu)")
    return torch.device(preference)


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
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _check_cpu_autocast(dtype: torch.dtype, cell: str, name: str) -> None:
    from lstm_textgen.model.recurrent import CELLS

    probe = CELLS[cell](4, 8, num_layers=2, batch_first=True)
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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for the forward pass; float32 runs without autocast."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backend(device: torch.device, threads: int | None) -> None:
    """CPU threads (`train.threads`, else every core) and cuDNN's autotuner on CUDA."""
    if device.type == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def token_source(ids: np.ndarray, device: torch.device, share_of_free: float = 0.5) -> torch.Tensor:
    """Where training batches are gathered from, without a full in-memory copy of a split it can read
    from the memory map: on the CPU the map itself (the OS pages in what the windows touch); on a GPU
    a device copy when it takes at most `share_of_free` of the free memory, else the host map (the
    Batcher gathers each batch there and copies it over through pinned memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if ids.nbytes * (4 if ids.dtype.itemsize > 1 else 1) <= share_of_free * free:
            return to_device_tokens(ids, device)
    with warnings.catch_warnings():  # a read-only map: nothing here ever writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(ids)


def to_device_tokens(ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """Move a split to the device once; uint8 stays uint8, wider ids become int32."""
    dtype = np.uint8 if ids.dtype == np.uint8 else np.int32
    return torch.from_numpy(np.array(ids, dtype=dtype, copy=True)).to(device)

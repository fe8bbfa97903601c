"""What the benchmark ran on, and a folder name per kind of machine so reports sit side by side."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from lstm_textgen.devices import cpu_has_native_bf16

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> str:
    return CPUINFO.read_text() if CPUINFO.exists() else ""


def cpu_name() -> str:
    for line in cpu_flags().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine() -> dict[str, Any]:
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info | {"kind": machine_slug(info)}


def machine_slug(info: dict[str, Any]) -> str:
    """vendor-vector unit-cores[-gpu], e.g. amd-epyc-avx2-2cores."""
    flags = cpu_flags()
    units = (("amx_bf16", "amx"), ("avx512_bf16", "avx512bf16"), ("avx512f", "avx512"), ("avx2", "avx2"))
    vector = next((name for flag, name in (*units, ("asimd", "neon")) if flag in flags), platform.machine())
    cpu = info["cpu"].lower()
    vendor = next((v for v in ("xeon", "epyc", "ryzen", "core", "apple", "graviton") if v in cpu), "cpu")
    vendor = {"xeon": "intel-xeon", "epyc": "amd-epyc", "ryzen": "amd-ryzen", "core": "intel-core"}.get(
        vendor, vendor
    )
    gpu = "-" + "-".join(info["cuda"].lower().split()[-2:]) if info.get("cuda") else ""
    return f"{vendor}-{vector or 'cpu'}-{info['cores']}cores{gpu}".replace("/", "-")

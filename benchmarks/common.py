"""What every benchmark shares: where the repository is, what machine it runs on (and the folder its
reports go to, one per kind of machine), the goals, a corpus to measure on and free ports.

Imports only torch, the standard library and the package's stdlib-only `network` at the top, so the
GPU check runs on a machine that has nothing else; the corpus helper imports the library's download
code when called."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lstm_textgen.network import free_port  # noqa: F401  (the benchmarks import it from here)

if TYPE_CHECKING:
    from lstm_textgen.params import Params

REPO = Path(__file__).resolve().parents[1]
CPUINFO = Path("/proc/cpuinfo")


def results_dir(kind: str) -> Path:
    """benchmarks/results/<kind of machine>/: reports of one kind of machine sit together."""
    return REPO / "benchmarks" / "results" / kind


# --- the machine

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> str:
    return CPUINFO.read_text() if CPUINFO.exists() else ""


def cpu_name() -> str:
    for line in cpu_flags().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def native_bf16() -> bool:
    from lstm_textgen.devices import cpu_has_native_bf16

    return cpu_has_native_bf16()


def machine() -> dict[str, Any]:
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": native_bf16(),
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


# --- the goals

# lstm-textgen over the notebook, measured in the same run
TRAINING_RATIO = 300.0  # useful next-token predictions per second
GENERATION_RATIO = {1: 10.0, 64: 200.0}  # characters per second, by batch size
# validation loss (nats/char, whole split, state carried) after `--budget-s` seconds of training;
# nanoGPT's Shakespeare character model reaches about this in three minutes on an A100
TARGET_LOSS = 1.47
# the GPU check: training seconds until the whole-split validation loss first reaches this
GPU_TARGET_LOSS = 1.50
# performance-anchors.md, measured on 2 CPU cores: (training seconds, validation loss)
ANCHORS = {
    "nanoGPT CPU recipe": (81, 1.886),
    "LSTM-256x2 bf16 @81 s": (81, 1.588),
    "LSTM-256x2 bf16 @180 s": (180, 1.489),
}


def verdict(value: float, goal: float, higher_is_better: bool = True) -> str:
    met = value >= goal if higher_is_better else value <= goal
    return "met" if met else "NOT met"


# make bench-scale: prepare throughput (corpus MB/s) by level, its peak memory, and training
# tokens/s on a 1 GB split within this fraction of a 1 MB split's
SCALE_PREPARE_MB_S = {"char": 50, "byte": 50, "word": 10, "bpe": 10}
SCALE_PREPARE_PEAK_MB = 1024
SCALE_TRAINING_RATIO = 0.10


# --- what the benchmarks take from this machine


def load_corpus(spec: str, params: Params, workdir: Path) -> str:
    """A key of params.yaml's corpora (downloaded and verified), a path, or a file:// or https:// URL."""
    from lstm_textgen.data.corpora import acquire
    from lstm_textgen.params import CorpusSpec

    name, corpus = (
        (spec, params.corpora[spec]) if spec in params.corpora else (Path(spec).stem, CorpusSpec(source=spec))
    )
    acquire(name, corpus, params.download, workdir / "corpus.txt")
    return (workdir / "corpus.txt").read_text(encoding="utf-8")


def prepare_default_corpus(workdir: Path) -> dict[str, Any]:
    """params.yaml's corpus downloaded and prepared in `workdir` (corpus.txt, prepared/, corpus.json),
    as the pipeline's download and prepare stages would; the params, as a dict to edit per run."""
    from lstm_textgen.data.corpora import acquire
    from lstm_textgen.data.preparation import prepare_corpus
    from lstm_textgen.files import write_json
    from lstm_textgen.params import load_params

    params = load_params(REPO / "params.yaml")
    name = params.data.corpus
    acquire(name, params.corpora[name], params.download, workdir / "corpus.txt")
    prepare_corpus(workdir / "corpus.txt", params.data, workdir / "prepared")
    write_json(workdir / "corpus.json", {"name": name})
    return params.model_dump()


def train_stage_command(workdir: Path, params: Path, out: Path) -> list[str]:
    """`python stages/train.py` on `params` and `workdir`'s prepared corpus, its outputs under `out`."""
    import sys

    command = [sys.executable, str(REPO / "stages" / "train.py"), "--params", str(params)]
    command += ["--prepared", str(workdir / "prepared"), "--corpus-info", str(workdir / "corpus.json")]
    command += ["--out", str(out / "model"), "--resume-from", str(out / "last.pt")]
    return [*command, "--metrics", str(out / "metrics")]

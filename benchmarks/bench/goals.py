"""The benchmark's goals and reference points, in one place: the report and the plot read them here."""

from __future__ import annotations

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

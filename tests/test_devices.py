"""The GPU path's decisions, tested on the CPU: where tensors go and how, window starts on splits too
large for float32, a resume that changes the precision. No test here needs a GPU; `make gpu-check`
measures what only a GPU can show."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_vocabulary, split_ids, tiny_params

from lstm_textgen.devices import (
    cpu_has_native_bf16,
    device_bytes,
    needs_loss_scaling,
    recurrent_dtype,
    resolve_device,
    to_device,
    to_device_tokens,
)
from lstm_textgen.inference.evaluation import evenly_spaced_starts, periodic_validation_loss
from lstm_textgen.model.recurrent import RecurrentLM
from lstm_textgen.params import ModelParams, with_settings
from lstm_textgen.train.batches import WindowBatcher
from lstm_textgen.train.loop import train


def test_a_gpu_resolves_to_an_indexed_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors on a GPU report `cuda:0`: a device without its index never equals theirs, and the
    batcher took every batch for a host tensor (and pinned a CUDA tensor: a crash at step 1)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for preference in ("auto", "cuda"):
        assert resolve_device(preference) == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


class PinSpy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pinned: list[torch.Size] = []
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args, **kwargs: self.pin(tensor))

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        assert tensor.device.type == "cpu", "only host tensors can be pinned"
        self.pinned.append(tensor.shape)
        return tensor


def test_only_host_tensors_bound_for_an_accelerator_are_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = PinSpy(monkeypatch)  # the "meta" device stands for a GPU: copies to it run on any machine
    host = torch.arange(6)
    assert to_device(host, torch.device("cpu")) is host and spy.pinned == []
    moved = to_device(host, torch.device("meta"))
    assert moved.device.type == "meta" and spy.pinned == [host.shape]
    assert to_device(moved, torch.device("meta")) is moved and len(spy.pinned) == 1


def test_batches_from_host_tokens_reach_the_device_through_pinned_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = PinSpy(monkeypatch)
    tokens = torch.arange(1000, dtype=torch.int32) % 7
    generator = torch.Generator().manual_seed(0)
    batcher = WindowBatcher(tokens, 16, 4, stateful=False, generator=generator, device=torch.device("meta"))
    batch, _ = batcher.next()
    assert batch.device.type == "meta" and batch.shape == (4, 17)
    assert spy.pinned == [torch.Size([4, 17])]  # the batch; the starts stay where the tokens are
    same = WindowBatcher(tokens, 16, 4, stateful=False, generator=torch.Generator().manual_seed(0))
    assert same.next()[0].device.type == "cpu" and len(spy.pinned) == 1
    # tokens on the device: the starts, drawn on the host, are the one copy, pinned and asynchronous
    on_device = WindowBatcher(
        tokens.to("meta"), 16, 4, stateful=False, generator=torch.Generator().manual_seed(0)
    )
    assert on_device.next()[0].device.type == "meta" and spy.pinned[1:] == [torch.Size([4])]


def test_a_split_goes_to_an_accelerator_in_pinned_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = PinSpy(monkeypatch)
    moved = to_device_tokens(np.arange(2500, dtype=np.uint16), torch.device("meta"), block=1000)
    assert moved.dtype == torch.int32 and moved.shape == (2500,) and moved.device.type == "meta"
    assert spy.pinned == [torch.Size([1000]), torch.Size([1000]), torch.Size([500])]
    assert to_device_tokens(np.arange(5, dtype=np.uint8), torch.device("cpu")).dtype == torch.uint8


def test_device_memory_of_a_split_counts_its_device_dtype() -> None:
    assert device_bytes(np.zeros(1000, np.uint8)) == 1000
    assert device_bytes(np.zeros(1000, np.uint16)) == 4000  # widened to int32 on the device
    assert device_bytes(np.zeros(1000, np.uint32)) == 4000


def test_any_float16_in_the_step_turns_loss_scaling_on() -> None:
    """CUDA's autocast runs cuDNN's recurrent layers in float16 even under bf16: scaled then too."""
    assert needs_loss_scaling(torch.bfloat16, torch.float16)  # bf16 autocast on CUDA
    assert needs_loss_scaling(torch.float16, torch.float16)
    assert not needs_loss_scaling(torch.bfloat16, torch.bfloat16)  # the CPU's bf16
    assert not needs_loss_scaling(torch.float32, torch.float32)
    assert recurrent_dtype(torch.device("cpu"), torch.float32) == torch.float32
    if cpu_has_native_bf16():  # the CPU's autocast lowers the LSTM, not the GRU: measured, not assumed
        assert recurrent_dtype(torch.device("cpu"), torch.bfloat16, "lstm") == torch.bfloat16
        assert recurrent_dtype(torch.device("cpu"), torch.bfloat16, "gru") == torch.float32


def test_measuring_the_recurrent_dtype_leaves_the_random_state_alone() -> None:
    """The probe is made after the model is seeded: its random weights must not shift dropout masks."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with contextlib.suppress(RuntimeError):  # a CPU without a float16 LSTM kernel: the probe still ran
        recurrent_dtype(torch.device("cpu"), torch.float16, "lstm")
    assert torch.equal(torch.rand(3), expected)


def test_window_starts_stay_inside_splits_past_two_to_the_24() -> None:
    for length in (50_000_000, 2**24 + 100, 1000):
        starts = evenly_spaced_starts(length, 64, 2560 if length > 1000 else 14)
        assert starts[0] == 0 and starts[-1] == length - 65
        assert bool((starts[1:] >= starts[:-1]).all())
    # float32 rounds the last start of this split up, past its end: an IndexError (on CUDA an assert)
    assert int(torch.linspace(0, 2**24 + 35, 3).long()[-1]) > 2**24 + 35


def test_the_periodic_estimate_reads_a_split_of_more_than_two_to_the_24_tokens() -> None:
    tokens = torch.zeros(2**24 + 100, dtype=torch.uint8)
    model = RecurrentLM(3, ModelParams(hidden=8, embedding_dim=4))
    loss = periodic_validation_loss(
        model, tokens, 64, num_windows=3, batch_size=3, last_only=False, dtype=torch.float32
    )
    assert 0 < loss < 5


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 autocast of an LSTM needs AVX512-BF16 or AMX")
def test_a_bf16_stateful_run_resumes_exactly_and_in_float32(tmp_path: Path) -> None:
    """The carried state is restored as float32: bf16 values survive the round trip (the resumed bf16
    run equals the uninterrupted one), and a resume with train.dtype float32 (allowed) runs."""
    text = "the quick brown fox jumps over the lazy dog. " * 200
    vocab = build_vocabulary(text, "char", lowercase=False)
    splits = split_ids(vocab.encode(text), 0.1, 0.1)
    params = tiny_params(train={"stateful": True, "dtype": "bfloat16"})
    whole = train(splits, vocab, params, tmp_path / "w.pt", tmp_path / "w-last.pt")
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    train(splits, vocab, params, best, last, on_eval=lambda record: record["step"] == 10)
    (tmp_path / "halted.pt").write_bytes(last.read_bytes())
    resumed = train(splits, vocab, with_settings(params, {"train.resume": True}), best, last)
    assert resumed.train_loss_last == whole.train_loss_last
    last.write_bytes((tmp_path / "halted.pt").read_bytes())
    in_float32 = with_settings(params, {"train.resume": True, "train.dtype": "float32"})
    assert train(splits, vocab, in_float32, best, last).dtype == "float32"

"""The recurrent language model: input encoding -> LSTM/GRU/RNN stack -> dropout -> linear head.

One model serves training, evaluation and generation: `forward` returns logits for every position
(or only the last, for the `last` objective) plus the recurrent state to carry forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lstm_textgen.devices import recurrent_layer
from lstm_textgen.params import ModelParams

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RecurrentLM(nn.Module):
    def __init__(self, vocab_size: int, params: ModelParams) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.input_kind = params.input
        if params.input == "embedding":
            self.embedding: nn.Embedding | None = nn.Embedding(vocab_size, params.embedding_dim)
            input_size = params.embedding_dim
        else:
            self.embedding = None
            input_size = vocab_size if params.input == "onehot" else 1
        self.rnn = recurrent_layer(params.cell)(
            input_size,
            params.hidden,
            num_layers=params.layers,
            batch_first=True,
            dropout=params.dropout if params.layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(params.dropout)
        self.head = nn.Linear(params.hidden, vocab_size)
        if params.tie_weights:
            assert self.embedding is not None  # validated in ModelParams
            self.head.weight = self.embedding.weight

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, input_size] floats, per `model.input`."""
        if self.embedding is not None:
            return self.embedding(tokens)
        dtype = self.head.weight.dtype
        if self.input_kind == "onehot":
            return F.one_hot(tokens, self.vocab_size).to(dtype)
        return (tokens.to(dtype) / self.vocab_size).unsqueeze(-1)  # scalar: id / vocabulary size

    def forward(
        self, tokens: torch.Tensor, state: State | None = None, last_only: bool = False
    ) -> tuple[torch.Tensor, State]:
        """Logits [B, T, V] (or [B, V] with `last_only`) and the new recurrent state."""
        outputs, state = self.rnn(self.encode(tokens), state)
        if last_only:
            outputs = outputs[:, -1]
        return self.head(self.dropout(outputs)), state


def detach_state(state: State) -> State:
    """Cut the graph between windows (truncated back-propagation through time)."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

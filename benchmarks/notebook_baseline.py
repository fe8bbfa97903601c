"""The reference notebook's approach, reproduced faithfully as the benchmark's baseline.

Tiny Shakespeare; 100-character windows materialised as float32 (token id / vocabulary size, shape
[N, 100, 1]) built with Python lists; a 4-layer LSTM-256 with input_size=1 predicting only the
character after each window; batch 128 from a shuffled DataLoader; Adam; CrossEntropyLoss(sum);
generation that re-feeds the whole 100-character window for every new character and keeps the most
frequent of 80 draws.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

WINDOW = 100
BATCH = 128
DRAWS = 80


def build_float_windows(text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The notebook's data preparation, as written there: Python lists, then reshape and scale."""
    chars = sorted(set(text))
    char_to_int = {c: i for i, c in enumerate(chars)}
    data_x, data_y = [], []
    for i in range(len(text) - WINDOW):
        data_x.append([char_to_int[c] for c in text[i : i + WINDOW]])
        data_y.append(char_to_int[text[i + WINDOW]])
    x = np.reshape(data_x, (len(data_x), WINDOW, 1)).astype(np.float32) / float(len(chars))
    return x, np.array(data_y), chars


class NotebookLSTM(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=1, hidden_size=256, num_layers=4, batch_first=True)
        self.linear = nn.Linear(256, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.linear(out[:, -1, :])


def make_training(x: np.ndarray, y: np.ndarray, vocab_size: int, seed: int = 0):
    """(model, optimizer, loss_fn, an endless iterator of shuffled batches)."""
    torch.manual_seed(seed)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True)
    model = NotebookLSTM(vocab_size)
    optimizer = torch.optim.Adam(model.parameters())
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def batches():
        while True:
            yield from loader

    return model, optimizer, loss_fn, batches()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, batch) -> float:
    xb, yb = batch
    loss = loss_fn(model(xb), yb)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def generate(
    model: NotebookLSTM,
    prompts: np.ndarray,
    length: int,
    vocab_size: int,
    temperature: float = 1.1,
    seed: int = 0,
) -> np.ndarray:
    """prompts: [B, 100] ids. Each new character re-feeds the last 100 and takes the mode of 80 draws."""
    generator = torch.Generator().manual_seed(seed)
    window = torch.as_tensor(prompts, dtype=torch.long)
    out = []
    for _ in range(length):
        logits = model((window.float() / vocab_size).unsqueeze(-1)) / temperature
        draws = torch.multinomial(torch.softmax(logits, -1), DRAWS, replacement=True, generator=generator)
        token = torch.mode(draws, dim=1).values
        out.append(token)
        window = torch.cat([window[:, 1:], token[:, None]], dim=1)
    return torch.stack(out, 1).numpy()

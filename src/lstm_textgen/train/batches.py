"""Training batches drawn by indexing a token tensor that lives on the device: no per-sample Python,
no DataLoader, no host copies."""

from __future__ import annotations

import torch

from lstm_textgen.devices import to_device
from lstm_textgen.errors import UserError


class WindowBatcher:
    """Stateless: `batch_size` windows at random offsets (from its own generator, so the draws do not
    depend on what else uses torch's global RNG). Stateful: `batch_size` parallel streams over
    contiguous stretches of the text, windows read in order, state reset when a stream wraps around.

    With several processes the batch of one step is global: `world_size * batch_size` windows (or
    streams), of which rank r takes the r-th `batch_size`. Every rank draws the same global offsets
    from the same seeded generator, so the ranks' windows never overlap, stateful ranks read disjoint
    contiguous stretches, and N processes see exactly the windows one process with N times the
    batch would see.

    `position` (windows drawn so far) and the generator's state are all a resume needs."""

    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        batch_size: int,
        *,
        stateful: bool,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
    ) -> None:
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.device = device or tokens.device  # tokens on the host, batches on a GPU: copied per step
        self.stateful, self.generator = stateful, generator
        self.global_batch = batch_size * world_size
        self.rank_rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.offsets = torch.arange(seq_len + 1, device=tokens.device)
        self.stream_len = len(tokens) // self.global_batch
        self.windows_per_stream = (self.stream_len - 1) // seq_len
        if stateful and self.windows_per_stream < 1:
            raise UserError(
                f"train.stateful: {self.global_batch} streams of {self.stream_len} tokens hold no window "
                f"of data.seq_len {seq_len}; lower train.batch_size (or train.processes) or data.seq_len"
            )
        self.position = 0

    def next(self) -> tuple[torch.Tensor, bool]:
        """[B, seq_len + 1] token ids (inputs are [:, :-1], targets [:, 1:]) and whether state resets."""
        if self.stateful:
            k = self.position % self.windows_per_stream
            starts = torch.arange(self.global_batch) * self.stream_len + k * self.seq_len
            reset = k == 0
        else:
            starts = torch.randint(
                0, len(self.tokens) - self.seq_len, (self.global_batch,), generator=self.generator
            )
            reset = True
        # drawn on the host: the same windows on any device
        starts = to_device(starts[self.rank_rows], self.tokens.device)
        self.position += 1
        batch = self.tokens[starts[:, None] + self.offsets]
        return to_device(batch, self.device).long(), reset

"""Generation one token at a time: prompts read into states (`warm_up`), then the recurrent stack laid
out for per-step speed (`Stepper`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from lstm_textgen.model.recurrent import State

if TYPE_CHECKING:
    from lstm_textgen.model.recurrent import RecurrentLM


class Stepper:
    """Generation one token at a time, identical (to float rounding) to `RecurrentLM.forward` on
    length-1 sequences, with the weights laid out once for per-step speed:

    - the first layer's input projection becomes a [vocab, gates] table (embedding/one-hot/scalar
      input times W_ih plus both biases), so its matrix product is a row lookup;
    - weights are pre-transposed and the biases of the other layers pre-summed where the cell allows;
    - LSTM gates are reordered to (input, forget, output, cell) so one sigmoid covers three gates;
    - the state is updated in place in buffers owned by the stepper.

    Inference only: dropout is not applied. The fused sequence kernels (oneDNN/cuDNN) spend most of a
    one-token call in set-up, and per-step cell calls repeat the layout work every token.
    """

    def __init__(self, model: RecurrentLM, state: State) -> None:
        rnn = model.rnn
        self.kind = (
            "lstm" if isinstance(rnn, nn.LSTM) else "gru" if isinstance(rnn, nn.GRU) else rnn.nonlinearity
        )
        self.layers, self.hidden = rnn.num_layers, rnn.hidden_size
        with torch.no_grad():
            vocab = torch.arange(model.vocab_size, device=model.head.weight.device)
            first_inputs = model.encode(vocab[None])[0].float()
            self.w_ih: list[torch.Tensor] = []  # [in, gates], transposed
            self.w_hh: list[torch.Tensor] = []  # [H, gates]
            self.b_ih: list[torch.Tensor] = []
            self.b_hh: list[torch.Tensor] = []
            for layer in range(self.layers):
                w_ih, w_hh, b_ih, b_hh = (
                    self._gate_order(getattr(rnn, f"{name}_l{layer}").detach().float())
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                )
                if self.kind != "gru":  # gates = x W_ih + h W_hh + (b_ih + b_hh)
                    b_ih, b_hh = b_ih + b_hh, torch.zeros_like(b_hh)
                self.w_ih.append(w_ih.t().contiguous())
                self.w_hh.append(w_hh.t().contiguous())
                self.b_ih.append(b_ih)
                self.b_hh.append(b_hh)
            self.table = torch.addmm(self.b_ih[0], first_inputs, self.w_ih[0])  # [vocab, gates]
            self.head_w = model.head.weight.detach().float().t().contiguous()
            self.head_b = model.head.bias.detach().float()
            if isinstance(state, tuple):
                self.h, self.c = state[0].float().clone(), state[1].float().clone()
            else:
                self.h, self.c = state.float().clone(), None

    def _gate_order(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.kind != "lstm":
            return tensor
        i, f, g, o = tensor.chunk(4, dim=0)
        return torch.cat([i, f, o, g])

    @property
    def state(self) -> State:
        return (self.h, self.c) if self.c is not None else self.h

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows of the state, in this order (finished rows leave the batch)."""
        self.h = self.h.index_select(1, rows)
        if self.c is not None:
            self.c = self.c.index_select(1, rows)

    def add_rows(self, state: State) -> None:
        """Append rows to the batch, e.g. prompts warmed while the others were generating."""
        h, c = state if isinstance(state, tuple) else (state, None)
        self.h = torch.cat([self.h, h.detach().float()], dim=1)
        if self.c is not None and c is not None:
            self.c = torch.cat([self.c, c.detach().float()], dim=1)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] token ids -> [B, vocab] logits for the next token; the state advances by one.
        No `torch.no_grad()` here: every tensor the step reads was made under it in `__init__`, so no
        graph is recorded anyway, and the decorator's enter and exit are a measurable part of a step
        at batch 1."""
        size = self.hidden
        x = tokens
        for layer in range(self.layers):
            h = self.h[layer]
            if layer == 0:
                gates_x = self.table.index_select(0, x)
            else:
                gates_x = torch.addmm(self.b_ih[layer], x, self.w_ih[layer])
            if self.kind == "lstm":
                gates = gates_x.addmm_(h, self.w_hh[layer])
                sig = gates[:, : 3 * size].sigmoid_()
                cell_in = gates[:, 3 * size :].tanh_()
                c = self.c[layer]  # type: ignore[index]
                c.mul_(sig[:, size : 2 * size]).addcmul_(sig[:, :size], cell_in)
                torch.mul(sig[:, 2 * size :], torch.tanh(c), out=h)
            elif self.kind == "gru":
                gates_h = torch.addmm(self.b_hh[layer], h, self.w_hh[layer])
                reset_update = gates_x[:, : 2 * size].add_(gates_h[:, : 2 * size]).sigmoid_()
                new = gates_x[:, 2 * size :].addcmul_(reset_update[:, :size], gates_h[:, 2 * size :]).tanh_()
                h.sub_(new).mul_(reset_update[:, size:]).add_(new)  # h' = n + z (h - n)
            else:
                gates = gates_x.addmm_(h, self.w_hh[layer])
                h.copy_(gates.tanh_() if self.kind == "tanh" else gates.relu_())
            x = h
        return torch.addmm(self.head_b, x, self.head_w)


def warm_up(
    model: RecurrentLM, prompt_ids: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, State]:
    """[B, V] next-token logits and the state after each prompt. A prompt asked several times (the
    `n` texts of one request) is read once; prompts of equal length share one call of the sequence
    kernel; the rows come back in the prompts' order."""
    distinct: dict[tuple[int, ...], int] = {}
    which = [distinct.setdefault(tuple(ids), len(distinct)) for ids in prompt_ids]
    prompts = list(distinct)
    by_length: dict[int, list[int]] = {}
    for row, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(row)
    outputs = [
        model(torch.tensor([prompts[r] for r in rows], dtype=torch.long, device=device), last_only=True)
        for rows in by_length.values()
    ]
    grouped = [r for rows in by_length.values() for r in rows]
    # from the grouped order to each prompt's row, repeats included
    back = torch.tensor(grouped, device=device).argsort()[torch.tensor(which, device=device)]
    logits = torch.cat([group_logits for group_logits, _ in outputs])[back]
    states = [group_state for _, group_state in outputs]
    if isinstance(states[0], tuple):  # LSTM: (h, c)
        pairs = zip(*states, strict=True)
        return logits.float(), tuple(torch.cat(parts, dim=1)[:, back] for parts in pairs)  # type: ignore[return-value]
    return logits.float(), torch.cat(states, dim=1)[:, back]  # type: ignore[arg-type]

"""The torch.nn.LSTM-style front end shared by every recurrent layer of the package.

A *cell* here provides:
  ``state_sizes``               sizes of its state tensors, e.g. (H, H) or (H, H, H_hat, H_hat);
  ``input_projection(x)``       the input-side products for a whole (T, B, I) sequence at once;
  ``step(xw_t, state, record)`` one time step -> (h_t, new_state); ``record`` is None or a dict
                                that collects per-step activity for analysis;
  optionally ``fused_forward(x, state)`` -> (outputs, state) or None: a fused whole-sequence
                                path over the raw (T, B, I) input, used when nothing is recorded
                                and no sequence is padded (None: not available, run ``step``).

``RecurrentLayers`` turns a stack of such cells into a module with nn.LSTM's contract: input
forms (time-major, batch_first, unbatched, PackedSequence), initial state, inter-layer dropout,
validation of shapes, and the final state as a tuple of (num_layers, B, size) tensors.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

State = tuple[torch.Tensor, ...]


def _initial_cell_state(cell: nn.Module, batch: int | None, ref: torch.Tensor) -> list[torch.Tensor]:
    shape = (lambda n: (batch, n)) if batch is not None else (lambda n: (n,))
    return [ref.new_zeros(shape(n)) for n in cell.state_sizes]


def run_cell(cell: nn.Module, input: torch.Tensor, hx: Sequence[torch.Tensor] | None) -> State:
    """``cell(input, hx)`` for a single step: input (B, I) or unbatched (I,)."""
    if not isinstance(input, torch.Tensor) or input.dim() not in (1, 2):
        raise ValueError(f"input must be a tensor of shape (batch, {cell.input_size}) or "
                         f"({cell.input_size},), got {_shape(input)}")
    if input.size(-1) != cell.input_size:
        raise ValueError(f"input has {input.size(-1)} features, expected input_size={cell.input_size}")
    batched = input.dim() == 2
    batch = input.size(0) if batched else None
    state = _initial_cell_state(cell, batch, input)
    if hx is not None:
        hx = _as_tuple(hx)
        if len(hx) not in (2, len(state)):
            raise ValueError(f"hx must hold {len(state)} tensors (or nn.LSTMCell's (h, c)), got {len(hx)}")
        for k, given in enumerate(hx):
            if given.shape != state[k].shape:
                raise ValueError(f"hx[{k}] has shape {tuple(given.shape)}, expected {tuple(state[k].shape)}")
            state[k] = given
    xw = cell.input_projection(input.unsqueeze(0) if batched else input.view(1, 1, -1))
    x_t = xw[0] if batched else xw[0]
    if not batched:
        state = [s.unsqueeze(0) for s in state]
    _, new_state = cell.step(x_t, tuple(state), None)
    if not batched:
        new_state = tuple(s.squeeze(0) for s in new_state)
    return tuple(new_state)


def _as_tuple(hx) -> tuple:
    if isinstance(hx, torch.Tensor) or not isinstance(hx, (tuple, list)):
        raise ValueError("hx must be a tuple of tensors, e.g. (h_0, c_0) as for torch.nn.LSTM")
    return tuple(hx)


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class RecurrentLayers(nn.Module):
    """A stack of recurrent cells with torch.nn.LSTM's forward contract."""

    def __init__(self, cells: Sequence[nn.Module], batch_first: bool = False, dropout: float = 0.0):
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.cells = nn.ModuleList(cells)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.input_size = cells[0].input_size
        self.hidden_size = cells[0].hidden_size
        self.num_layers = len(cells)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")

    # ------------------------------------------------------------------------------------
    def forward(self, input, hx=None):
        output, state, _ = self._forward(input, hx, record=False)
        return output, state

    def forward_with_activity(self, input, hx=None):
        """Like ``forward`` but also returns, per layer, a dict of time-major per-step tensors
        (for a HyperLSTM: ``d_h``, ``d_x``, ``bias`` of shape (T, B, 4, hidden_size), gate order
        i, g, f, o, and ``h_hat`` of shape (T, B, hyper_size)). Padded steps of a PackedSequence
        hold the values computed on padding; mask them with the lengths."""
        return self._forward(input, hx, record=True)

    # ------------------------------------------------------------------------------------
    def _forward(self, input, hx, record: bool):
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)  # (T, B, I) in the caller's batch order
            batched = True
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                raise ValueError("input must be (seq_len, batch, input_size), (batch, seq_len, input_size) "
                                 f"with batch_first=True, (seq_len, input_size) or a PackedSequence; got {_shape(input)}")
            batched = input.dim() == 3
            x = input if not batched else (input.transpose(0, 1) if self.batch_first else input)
            if not batched:
                x = x.unsqueeze(1)
            lengths = None
        if x.size(-1) != self.input_size:
            raise ValueError(f"input has {x.size(-1)} features, expected input_size={self.input_size}")
        if x.size(0) == 0:
            raise ValueError("input has an empty time dimension")
        B = x.size(1)
        states = self._initial_states(hx, B, batched, x)
        mask = None
        if lengths is not None:
            steps = torch.arange(x.size(0), device=x.device).unsqueeze(1)
            mask = (steps < lengths.to(x.device).unsqueeze(0)).unsqueeze(-1)  # (T, B, 1)

        activity: list[dict] = []
        finals: list[State] = []
        for k, cell in enumerate(self.cells):
            rec = {} if record else None
            x, final = self._run_layer(cell, x, states[k], mask, rec)
            finals.append(final)
            if rec is not None:
                activity.append({name: torch.stack(v) for name, v in rec.items()})
            if self.dropout > 0.0 and self.training and k < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)

        state = tuple(torch.stack(parts) for parts in zip(*finals))
        if packed:
            output = self._repack(x, lengths, input)
        else:
            output = x if batched else x.squeeze(1)
            if batched and self.batch_first:
                output = output.transpose(0, 1)
        if not batched:
            state = tuple(s.squeeze(1) for s in state)
            activity = [{n: v.squeeze(1) for n, v in a.items()} for a in activity]
        return output, state, activity

    def _run_layer(self, cell, x, state: State, mask, rec):
        if rec is None and mask is None:
            # A whole-sequence fused path (see _fused.py) when the cell has one for its config.
            fused = getattr(cell, "fused_forward", None)
            result = fused(x, state) if fused is not None else None
            if result is not None:
                return result
        xw = cell.input_projection(x)
        outputs = []
        for t in range(x.size(0)):
            h, new_state = cell.step(xw[t], state, rec)
            if mask is not None:  # finished sequences keep their last state and output zeros
                m = mask[t]
                new_state = tuple(torch.where(m, n, s) for n, s in zip(new_state, state))
                h = h * m
            state = new_state
            outputs.append(h)
        return torch.stack(outputs), state

    def _initial_states(self, hx, batch: int, batched: bool, ref: torch.Tensor) -> list[State]:
        sizes = self.cells[0].state_sizes
        zeros = [ref.new_zeros(self.num_layers, batch, n) for n in sizes]
        if hx is not None:
            hx = _as_tuple(hx)
            if len(hx) not in (2, len(sizes)):
                raise ValueError(f"hx must be a tuple of {len(sizes)} tensors (the state this module returns) "
                                 f"or nn.LSTM's (h_0, c_0); got {len(hx)} tensors")
            for k, given in enumerate(hx):
                if not isinstance(given, torch.Tensor):
                    raise ValueError(f"hx[{k}] must be a tensor, got {type(given).__name__}")
                expected = (self.num_layers, batch, sizes[k]) if batched else (self.num_layers, sizes[k])
                if tuple(given.shape) != expected:
                    raise ValueError(f"hx[{k}] has shape {tuple(given.shape)}, expected {expected}")
                zeros[k] = given if batched else given.unsqueeze(1)
        return [tuple(z[k] for z in zeros) for k in range(self.num_layers)]

    @staticmethod
    def _repack(padded: torch.Tensor, lengths: torch.Tensor, like: PackedSequence) -> PackedSequence:
        # Pack in the input's own sorted order so batch_sizes and data rows line up with it.
        if like.sorted_indices is not None:
            padded = padded.index_select(1, like.sorted_indices)
            lengths = lengths.index_select(0, like.sorted_indices.cpu())
        data = pack_padded_sequence(padded, lengths, enforce_sorted=True).data
        return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)

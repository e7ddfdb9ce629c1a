"""LSTM building blocks shared by the baseline and the HyperLSTM.

Gate order everywhere in this package is the paper's: i (input), g (candidate), f (forget),
o (output), each a block of ``hidden_size`` rows in the stacked ``4 * hidden_size`` weights.

The baseline ``LSTM`` has torch.nn.LSTM's constructor and forward contract, plus the two
options the paper's baselines use: layer normalisation (on each gate's pre-activation and on
the cell before the output tanh) and recurrent dropout on the candidate (Semeniuta et al.,
which drops no memory).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hypernetworks.nn import _fused
from hypernetworks.nn._sequence import RecurrentLayers, run_cell

GATES = ("i", "g", "f", "o")


def check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_probability(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


class GateLayerNorm(nn.Module):
    """Layer norm applied separately to each of ``groups`` blocks of ``size`` features,
    with its own gain and bias per block (the paper normalises every gate on its own)."""

    def __init__(self, groups: int, size: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.size, self.eps = groups, size, eps
        self.weight = nn.Parameter(torch.ones(groups, size))
        self.bias = nn.Parameter(torch.zeros(groups, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(*shape[:-1], self.groups, self.size)
        x = F.layer_norm(x, (self.size,), eps=self.eps) * self.weight + self.bias
        return x.reshape(shape)


def lstm_update(
    pre: torch.Tensor,
    c: torch.Tensor,
    gate_norm: GateLayerNorm | None,
    cell_norm: nn.LayerNorm | None,
    recurrent_dropout: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM state update from stacked gate pre-activations ``pre`` (B, 4H), order i, g, f, o."""
    if gate_norm is not None:
        pre = gate_norm(pre)
    i, g, f, o = pre.chunk(4, dim=-1)
    g = torch.tanh(g)
    if recurrent_dropout > 0.0 and training:
        g = F.dropout(g, recurrent_dropout, training=True)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * g
    h = torch.sigmoid(o) * torch.tanh(cell_norm(c) if cell_norm is not None else c)
    return h, c


def orthogonal_per_gate_(weight: torch.Tensor, gates: int) -> None:
    """Orthogonal init of each gate's (H x in) block separately, as the paper asks for W_h."""
    with torch.no_grad():
        for block in weight.chunk(gates, dim=0):
            nn.init.orthogonal_(block)


class LSTMCell(nn.Module):
    """An LSTM cell with optional layer norm and recurrent dropout.

    ``forward(input (B, I) or (I,), hx=None) -> (h, c)``, like ``torch.nn.LSTMCell``. The
    weights are stacked in gate order i, g, f, o (not PyTorch's i, f, g, o).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 layer_norm: bool = False, recurrent_dropout: float = 0.0):
        super().__init__()
        self.input_size = check_positive("input_size", input_size)
        self.hidden_size = check_positive("hidden_size", hidden_size)
        self.recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout)
        self.layer_norm = bool(layer_norm)
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
        self.bias = nn.Parameter(torch.zeros(4 * H)) if bias else None
        self.gate_norm = GateLayerNorm(4, H) if layer_norm else None
        self.cell_norm = nn.LayerNorm(H) if layer_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        H = self.hidden_size
        bound = 1.0 / math.sqrt(H)
        nn.init.uniform_(self.weight_ih, -bound, bound)
        orthogonal_per_gate_(self.weight_hh, 4)
        # Forget-gate bias +1. Under layer norm a constant added before the norm is removed
        # with the mean, so the +1 goes into the norm's own bias instead.
        target = self.gate_norm.bias[2] if self.gate_norm is not None else (
            self.bias[2 * H:3 * H] if self.bias is not None else None)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.gate_norm is not None:
            nn.init.ones_(self.gate_norm.weight)
            nn.init.zeros_(self.gate_norm.bias)
            nn.init.ones_(self.cell_norm.weight)
            nn.init.zeros_(self.cell_norm.bias)
        if target is not None:
            with torch.no_grad():
                target.fill_(1.0)

    # -- the sequence interface used by RecurrentLayers ---------------------------------
    state_sizes = property(lambda self: (self.hidden_size, self.hidden_size))

    def input_projection(self, x: torch.Tensor) -> torch.Tensor:
        """W_x x_t (+ b) for every step at once: one matrix multiply before the time loop."""
        return F.linear(x, self.weight_ih, self.bias)

    def step(self, xw: torch.Tensor, state: tuple[torch.Tensor, ...], record: dict | None = None):
        h, c = state
        pre = xw + F.linear(h, self.weight_hh)
        h, c = lstm_update(pre, c, self.gate_norm, self.cell_norm, self.recurrent_dropout, self.training)
        return h, (h, c)

    # Set to False to force the reference ``step`` loop (see hypernetworks/nn/_fused.py).
    fused = True

    def fused_forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
        return _fused.lstm_sequence(self, x, state)

    def forward(self, input: torch.Tensor, hx: tuple[torch.Tensor, ...] | None = None):
        return run_cell(self, input, hx)


class LSTM(RecurrentLayers):
    """Multi-layer LSTM with torch.nn.LSTM's constructor and forward contract, plus
    ``layer_norm`` and ``recurrent_dropout``.

    ``output, (h_n, c_n) = lstm(input, hx=None)``; input (T, B, I), (B, T, I) when
    ``batch_first``, unbatched (T, I), or a PackedSequence. ``h_n``/``c_n`` are
    (num_layers, B, hidden_size) (no batch dimension for unbatched input).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, layer_norm: bool = False,
                 recurrent_dropout: float = 0.0):
        check_positive("input_size", input_size)
        check_positive("hidden_size", hidden_size)
        check_positive("num_layers", num_layers)
        cells = [LSTMCell(input_size if k == 0 else hidden_size, hidden_size, bias=bias,
                          layer_norm=layer_norm, recurrent_dropout=recurrent_dropout)
                 for k in range(num_layers)]
        super().__init__(cells, batch_first=batch_first, dropout=dropout)
        self.layer_norm = bool(layer_norm)
        self.recurrent_dropout = float(recurrent_dropout)

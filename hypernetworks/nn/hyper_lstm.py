"""Dynamic hypernetworks for recurrent networks (Ha, Dai and Le, 2016, section 3.2).

A small *hyper* LSTM reads [h_{t-1}; x_t] and, at every step and for every example, emits
embeddings z that become weight-scaling vectors d(z) for the main LSTM's gates:

    z_h = W_hz h_hat_t + b_hz      z_x = W_xz h_hat_t + b_xz      z_b = W_bz h_hat_t
    d_h = W_hd z_h                 d_x = W_xd z_x                 b(z) = W_bd z_b + b_0
    gate_pre = d_h * (W_h h_{t-1}) + d_x * (W_x x_t) + b(z)        (per gate i, g, f, o)

This "weight scaling" form never materialises a per-step weight matrix. The input products
W_x x_t of a whole sequence are one matrix multiply before the time loop.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from hypernetworks.nn import _fused
from hypernetworks.nn._sequence import RecurrentLayers, run_cell
from hypernetworks.nn.lstm import (GateLayerNorm, LSTM, LSTMCell, check_positive, check_probability,
                                   lstm_update, orthogonal_per_gate_)

# The paper's initial weight scale: every d starts at this value (as in recurrent batch norm).
INITIAL_SCALE = 0.1


class WeightScaling(nn.Module):
    """The hypernetwork's output head: h_hat -> (d_h, d_x, b(z)) for ``gates`` gate blocks.

    The per-gate maps W_hd^y (N_z -> H) are stored as one (3, gates, H, N_z) tensor so that all
    of them run as a single batched product.
    """

    def __init__(self, hyper_size: int, hidden_size: int, embedding_size: int, gates: int, bias: bool = True):
        super().__init__()
        self.gates, self.hidden_size, self.embedding_size = gates, hidden_size, embedding_size
        n = gates * embedding_size
        self.z_weight = nn.Parameter(torch.empty(3 * n, hyper_size))  # rows: z_h, z_x, z_b
        self.z_bias = nn.Parameter(torch.empty(2 * n))                # z_h and z_x only
        self.d_weight = nn.Parameter(torch.empty(3, gates, hidden_size, embedding_size))
        self.bias = nn.Parameter(torch.zeros(gates * hidden_size)) if bias else None  # b_0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        n = self.gates * self.embedding_size
        with torch.no_grad():
            self.z_weight[: 2 * n].zero_()          # z_h, z_x start at exactly 1 ...
            self.z_bias.fill_(1.0)
            nn.init.normal_(self.z_weight[2 * n:], std=0.01)  # ... z_b small and random
            self.d_weight[:2].fill_(INITIAL_SCALE / self.embedding_size)  # so d_h = d_x = 0.1
            self.d_weight[2].zero_()                 # and the dynamic bias starts at 0
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, h_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.gates * self.embedding_size
        z = F.linear(h_hat, self.z_weight)
        z = torch.cat([z[..., : 2 * n] + self.z_bias, z[..., 2 * n:]], dim=-1)
        z = z.unflatten(-1, (3, self.gates, self.embedding_size))
        d = torch.einsum("...kgz,kghz->...kgh", z, self.d_weight).flatten(-2)  # (..., 3, G*H)
        d_h, d_x, d_b = d.unbind(-2)
        if self.bias is not None:
            d_b = d_b + self.bias
        return d_h, d_x, d_b


class HyperLSTMCell(nn.Module):
    """An LSTM cell whose weights are rescaled at every step by a small hyper LSTM.

    ``forward(input (B, I) or (I,), hx=None) -> (h, c, h_hat, c_hat)``: the main state (h, c)
    of size ``hidden_size`` and the hyper LSTM's state of size ``hyper_size``. ``hx`` may be
    that 4-tuple, or nn.LSTMCell's ``(h, c)`` (the hyper state then starts at zero).

    ``layer_norm`` normalises every gate pre-activation and the cell (main and hyper LSTM);
    ``recurrent_dropout`` drops the candidate g (no memory loss) in both, unless
    ``hyper_recurrent_dropout`` sets the hyper LSTM's own rate.
    """

    def __init__(self, input_size: int, hidden_size: int, hyper_size: int = 128, embedding_size: int = 4,
                 bias: bool = True, layer_norm: bool = False, recurrent_dropout: float = 0.0,
                 hyper_recurrent_dropout: float | None = None):
        super().__init__()
        self.input_size = check_positive("input_size", input_size)
        self.hidden_size = check_positive("hidden_size", hidden_size)
        self.hyper_size = check_positive("hyper_size", hyper_size)
        self.embedding_size = check_positive("embedding_size", embedding_size)
        self.recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout)
        hyper_rd = recurrent_dropout if hyper_recurrent_dropout is None else hyper_recurrent_dropout
        check_probability("hyper_recurrent_dropout", hyper_rd)
        self.layer_norm = bool(layer_norm)
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size))  # W_x, gates i, g, f, o
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))           # W_h
        # The hyper LSTM reads [h_{t-1}; x_t]: columns [:H] of its weight_ih see h, [H:] see x.
        self.hyper = LSTMCell(H + input_size, hyper_size, bias=True, layer_norm=layer_norm,
                              recurrent_dropout=hyper_rd)
        self.scaling = WeightScaling(hyper_size, H, embedding_size, gates=4, bias=bias)
        self.gate_norm = GateLayerNorm(4, H) if layer_norm else None
        self.cell_norm = nn.LayerNorm(H) if layer_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        H = self.hidden_size
        orthogonal_per_gate_(self.weight_ih, 4)  # the paper: orthogonal W_x and W_h
        orthogonal_per_gate_(self.weight_hh, 4)
        self.hyper.reset_parameters()
        self.scaling.reset_parameters()
        with torch.no_grad():
            if self.gate_norm is not None:  # forget bias +1 after the norm (see LSTMCell)
                self.gate_norm.weight.fill_(1.0)
                self.gate_norm.bias.zero_()
                self.gate_norm.bias[2].fill_(1.0)
                self.cell_norm.reset_parameters()
            elif self.scaling.bias is not None:
                self.scaling.bias[2 * H:3 * H].fill_(1.0)

    state_sizes = property(lambda self: (self.hidden_size, self.hidden_size, self.hyper_size, self.hyper_size))

    def input_projection(self, x: torch.Tensor) -> torch.Tensor:
        """[W_x x_t, W_hat_x x_t + b_hat] for all steps: (T, B, 4H + 4H_hat)."""
        hyper_x = self.hyper.weight_ih[:, self.hidden_size:]
        return torch.cat([F.linear(x, self.weight_ih), F.linear(x, hyper_x, self.hyper.bias)], dim=-1)

    def step(self, xw: torch.Tensor, state, record: dict | None = None):
        h, c, h_hat, c_hat = state
        H = self.hidden_size
        xw_main, xw_hyper = xw[..., : 4 * H], xw[..., 4 * H:]
        hyper = self.hyper
        hyper_pre = xw_hyper + F.linear(h, hyper.weight_ih[:, :H]) + F.linear(h_hat, hyper.weight_hh)
        h_hat, c_hat = lstm_update(hyper_pre, c_hat, hyper.gate_norm, hyper.cell_norm,
                                   hyper.recurrent_dropout, self.training)
        d_h, d_x, bias = self.scaling(h_hat)
        pre = d_h * F.linear(h, self.weight_hh) + d_x * xw_main + bias
        h, c = lstm_update(pre, c, self.gate_norm, self.cell_norm, self.recurrent_dropout, self.training)
        if record is not None:
            for name, value in (("d_h", d_h), ("d_x", d_x), ("bias", bias)):
                record.setdefault(name, []).append(value.unflatten(-1, (4, H)))
            record.setdefault("h_hat", []).append(h_hat)
        return h, (h, c, h_hat, c_hat)

    # Set to False to force the reference ``step`` loop (see hypernetworks/nn/_fused.py).
    fused = True

    def fused_forward(self, x: torch.Tensor, state):
        return _fused.hyper_lstm_sequence(self, x, state)

    def forward(self, input: torch.Tensor, hx=None):
        return run_cell(self, input, hx)


class HyperLSTM(RecurrentLayers):
    """Multi-layer HyperLSTM, a drop-in for ``torch.nn.LSTM``.

    ``output, state = m(input, hx=None)`` with input (T, B, I), (B, T, I) when ``batch_first``,
    unbatched (T, I), or a PackedSequence; ``output`` has nn.LSTM's shape.

    State format: ``state = (h, c, h_hat, c_hat)`` where ``h`` and ``c`` are the main LSTM's
    (num_layers, B, hidden_size) tensors exactly as nn.LSTM returns them, and ``h_hat``,
    ``c_hat`` are each layer's hyper LSTM state, (num_layers, B, hyper_size). Pass it back
    as ``hx`` to continue a sequence (truncated BPTT); nn.LSTM's ``(h_0, c_0)`` is accepted
    too, the hyper state then starting at zero. Unbatched input drops the B dimension.

    ``forward_with_activity`` also returns the per-step scaling vectors for analysis.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, hyper_size: int = 128,
                 embedding_size: int = 4, layer_norm: bool = False, recurrent_dropout: float = 0.0,
                 hyper_recurrent_dropout: float | None = None):
        check_positive("input_size", input_size)
        check_positive("hidden_size", hidden_size)
        check_positive("num_layers", num_layers)
        cells = [HyperLSTMCell(input_size if k == 0 else hidden_size, hidden_size, hyper_size=hyper_size,
                               embedding_size=embedding_size, bias=bias, layer_norm=layer_norm,
                               recurrent_dropout=recurrent_dropout,
                               hyper_recurrent_dropout=hyper_recurrent_dropout)
                 for k in range(num_layers)]
        super().__init__(cells, batch_first=batch_first, dropout=dropout)
        self.hyper_size = hyper_size
        self.embedding_size = embedding_size
        self.layer_norm = bool(layer_norm)
        self.recurrent_dropout = float(recurrent_dropout)


class HyperRNNCell(nn.Module):
    """The basic HyperRNN: a tanh RNN whose weights are rescaled by a small tanh hyper RNN.

        h_hat_t = tanh(W_hat [h_{t-1}; x_t] + U_hat h_hat_{t-1} + b_hat)
        h_t     = tanh(d_h(z) * (W_h h_{t-1}) + d_x(z) * (W_x x_t) + b(z))

    ``forward(input, hx=None) -> (h, h_hat)``.
    """

    def __init__(self, input_size: int, hidden_size: int, hyper_size: int = 128, embedding_size: int = 4,
                 bias: bool = True):
        super().__init__()
        self.input_size = check_positive("input_size", input_size)
        self.hidden_size = check_positive("hidden_size", hidden_size)
        self.hyper_size = check_positive("hyper_size", hyper_size)
        self.embedding_size = check_positive("embedding_size", embedding_size)
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(H, H))
        self.hyper = nn.RNNCell(H + input_size, hyper_size, bias=True, nonlinearity="tanh")
        self.scaling = WeightScaling(hyper_size, H, embedding_size, gates=1, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.weight_ih)
        nn.init.orthogonal_(self.weight_hh)
        self.hyper.reset_parameters()
        self.scaling.reset_parameters()

    state_sizes = property(lambda self: (self.hidden_size, self.hyper_size))

    def input_projection(self, x: torch.Tensor) -> torch.Tensor:
        hyper_x = self.hyper.weight_ih[:, self.hidden_size:]
        return torch.cat([F.linear(x, self.weight_ih), F.linear(x, hyper_x, self.hyper.bias_ih)], dim=-1)

    def step(self, xw: torch.Tensor, state, record: dict | None = None):
        h, h_hat = state
        H = self.hidden_size
        xw_main, xw_hyper = xw[..., :H], xw[..., H:]
        h_hat = torch.tanh(xw_hyper + F.linear(h, self.hyper.weight_ih[:, :H])
                           + F.linear(h_hat, self.hyper.weight_hh, self.hyper.bias_hh))
        d_h, d_x, bias = self.scaling(h_hat)
        h = torch.tanh(d_h * F.linear(h, self.weight_hh) + d_x * xw_main + bias)
        if record is not None:
            for name, value in (("d_h", d_h), ("d_x", d_x), ("bias", bias)):
                record.setdefault(name, []).append(value.unsqueeze(-2))
            record.setdefault("h_hat", []).append(h_hat)
        return h, (h, h_hat)

    def forward(self, input: torch.Tensor, hx=None):
        return run_cell(self, input, hx)


class HyperRNN(RecurrentLayers):
    """Multi-layer HyperRNN with nn.RNN's forward contract; state ``(h, h_hat)``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, hyper_size: int = 128, embedding_size: int = 4):
        check_positive("num_layers", num_layers)
        cells = [HyperRNNCell(input_size if k == 0 else hidden_size, hidden_size, hyper_size=hyper_size,
                              embedding_size=embedding_size, bias=bias) for k in range(num_layers)]
        super().__init__(cells, batch_first=batch_first, dropout=dropout)


def gate_change_intensity(d_h: torch.Tensor, initial: torch.Tensor | None = None) -> torch.Tensor:
    """How strongly the hypernetwork changes each hidden-to-gate matrix at each step.

    ``d_h`` is (T, ..., gates, H) as recorded by ``forward_with_activity``; returns (T, ..., gates):
    the L2 norm over units of d_h[t] - d_h[t-1], i.e. the Frobenius norm of the change of the
    effective matrix diag(d_h) W_h relative to W_h's rows. The first step is compared with
    ``initial`` when given, else it is 0.
    """
    if d_h.dim() < 3:
        raise ValueError(f"d_h must be (T, ..., gates, hidden), got shape {tuple(d_h.shape)}")
    previous = torch.cat([(d_h[:1] if initial is None else initial.unsqueeze(0)), d_h[:-1]], dim=0)
    return (d_h - previous).norm(dim=-1)


CELL_KINDS = ("lstm", "ln-lstm", "hyperlstm", "ln-hyperlstm")


def build_recurrent(cell: str, input_size: int, hidden_size: int, num_layers: int = 1, *,
                    batch_first: bool = False, dropout: float = 0.0, recurrent_dropout: float = 0.0,
                    hyper_size: int = 128, embedding_size: int = 4, bias: bool = True,
                    hyper_recurrent_dropout: float | None = None) -> RecurrentLayers:
    """The recurrent stack for an experiment's ``cell`` option: one of ``CELL_KINDS``."""
    if cell not in CELL_KINDS:
        raise ValueError(f"cell must be one of {', '.join(CELL_KINDS)}; got {cell!r}")
    layer_norm = cell.startswith("ln-")
    common = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, dropout=dropout,
                  layer_norm=layer_norm, recurrent_dropout=recurrent_dropout)
    if cell.endswith("hyperlstm"):
        return HyperLSTM(input_size, hidden_size, hyper_size=hyper_size, embedding_size=embedding_size,
                         hyper_recurrent_dropout=hyper_recurrent_dropout, **common)
    return LSTM(input_size, hidden_size, **common)

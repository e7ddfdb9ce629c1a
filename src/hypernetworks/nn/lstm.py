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


# What the original TensorFlow code (hardmaru's supercell) chose where this package differs; the
# package's defaults stay those of torch (eps 1e-5, gain and bias) and of the paper (orthogonal W_x).
ORIGINAL_LAYER_NORM_EPS = 1e-3
INPUT_INITS = ("orthogonal", "xavier_uniform", "uniform")


def check_eps(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"layer_norm_eps must be a positive number, got {value!r}")
    return float(value)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def init_input_weight_(weight: torch.Tensor, kind: str, gates: int, hidden_size: int) -> None:
    """Initialise a stacked (gates * H, in) input weight: ``orthogonal`` per gate (the paper),
    ``xavier_uniform`` over the whole matrix (TensorFlow's default for ``tf.get_variable``, which the
    original code used), or ``uniform`` in +-1/sqrt(H) (torch.nn.LSTM's default)."""
    if kind == "orthogonal":
        orthogonal_per_gate_(weight, gates)
    elif kind == "xavier_uniform":
        nn.init.xavier_uniform_(weight)
    else:
        bound = 1.0 / math.sqrt(hidden_size)
        nn.init.uniform_(weight, -bound, bound)


class GateLayerNorm(nn.Module):
    """Layer norm applied separately to each of ``groups`` blocks of ``size`` features,
    with its own gain and bias per block (the paper normalises every gate on its own).
    ``bias=False`` keeps the gain only, as the original TensorFlow code did."""

    def __init__(self, groups: int, size: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.groups, self.size, self.eps = groups, size, eps
        self.weight = nn.Parameter(torch.ones(groups, size))
        self.bias = nn.Parameter(torch.zeros(groups, size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(*shape[:-1], self.groups, self.size)
        x = F.layer_norm(x, (self.size,), eps=self.eps) * self.weight
        if self.bias is not None:
            x = x + self.bias
        return x.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.groups}, {self.size}, eps={self.eps}, bias={self.bias is not None}"


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
    if gate_norm is not None and gate_norm.bias is None:
        f = f + 1.0  # gain-only norm: the forget bias +1 is a constant after it, as in the original code
    g = torch.tanh(g)
    if recurrent_dropout > 0.0 and training:
        g = F.dropout(g, recurrent_dropout, training=True)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * g
    h = torch.sigmoid(o) * torch.tanh(cell_norm(c) if cell_norm is not None else c)
    return h, c


def reset_norms_(gate_norm: GateLayerNorm, cell_norm: nn.LayerNorm) -> None:
    """Gains 1 and biases 0 (the forget +1 is set by the caller)."""
    for norm in (gate_norm, cell_norm):
        nn.init.ones_(norm.weight)
        if norm.bias is not None:
            nn.init.zeros_(norm.bias)


def orthogonal_per_gate_(weight: torch.Tensor, gates: int) -> None:
    """Orthogonal init of each gate's (H x in) block separately, as the paper asks for W_h."""
    with torch.no_grad():
        for block in weight.chunk(gates, dim=0):
            nn.init.orthogonal_(block)


class LSTMCell(nn.Module):
    """An LSTM cell with optional layer norm and recurrent dropout.

    ``forward(input (B, I) or (I,), hx=None) -> (h, c)``, like ``torch.nn.LSTMCell``. The
    weights are stacked in gate order i, g, f, o (not PyTorch's i, f, g, o), with one bias
    vector ``bias`` (nn.LSTMCell has two, ``bias_ih`` and ``bias_hh``, whose sum is this one).

    Options of the original TensorFlow code (defaults are torch's and the paper's):
    ``layer_norm_eps`` (torch 1e-5; the original 1e-3), ``layer_norm_bias`` (False: gain-only
    norms as in the original, with the forget bias +1 a constant after the gate norm), and
    ``input_init`` for ``weight_ih``: ``uniform`` +-1/sqrt(H) (torch's), ``orthogonal`` per gate,
    or ``xavier_uniform`` (TensorFlow's default initialiser, the original code's).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 layer_norm: bool = False, recurrent_dropout: float = 0.0, layer_norm_eps: float = 1e-5,
                 layer_norm_bias: bool = True, input_init: str = "uniform"):
        super().__init__()
        self.input_size = check_positive("input_size", input_size)
        self.hidden_size = check_positive("hidden_size", hidden_size)
        self.recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout)
        self.layer_norm = bool(layer_norm)
        self.layer_norm_eps = check_eps(layer_norm_eps)
        self.layer_norm_bias = bool(layer_norm_bias)
        self.input_init = check_choice("input_init", input_init, INPUT_INITS)
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
        self.bias = nn.Parameter(torch.zeros(4 * H)) if bias else None
        self.gate_norm = GateLayerNorm(4, H, self.layer_norm_eps, self.layer_norm_bias) if layer_norm else None
        self.cell_norm = nn.LayerNorm(H, self.layer_norm_eps, bias=self.layer_norm_bias) if layer_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        H = self.hidden_size
        init_input_weight_(self.weight_ih, self.input_init, 4, H)
        orthogonal_per_gate_(self.weight_hh, 4)
        # Forget-gate bias +1. Under layer norm a constant added before the norm is removed
        # with the mean, so the +1 goes into the norm's own bias instead (or, for a gain-only
        # norm, is a constant added after it: see lstm_update).
        if self.gate_norm is not None:
            target = self.gate_norm.bias[2] if self.gate_norm.bias is not None else None
        else:
            target = self.bias[2 * H:3 * H] if self.bias is not None else None
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.gate_norm is not None:
            reset_norms_(self.gate_norm, self.cell_norm)
        if target is not None:
            with torch.no_grad():
                target.fill_(1.0)

    # The fused kernels cover gain-and-bias norms only; other configurations run ``step``.
    fused_supported = property(lambda self: self.gate_norm is None or self.gate_norm.bias is not None)

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
        return _fused.lstm_sequence(self, x, state) if self.fused_supported else None

    def forward(self, input: torch.Tensor, hx: tuple[torch.Tensor, ...] | None = None):
        return run_cell(self, input, hx)


def check_projection(proj_size) -> None:
    if proj_size != 0:
        raise ValueError(
            f"proj_size={proj_size!r} is not supported: these layers have no LSTM projection (Sak et al. 2014), "
            "and in a HyperLSTM the hyper LSTM reads the main h, so a projected h would change the "
            "paper's model; use proj_size=0 and a separate nn.Linear on the output if you need one")


def stack_cells(make_cell, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool):
    """One cell per layer (and per direction): layer k > 0 reads the previous layer's output,
    which is ``hidden_size * num_directions`` wide. Returns (forward cells, reverse cells or None)."""
    if bidirectional not in (True, False):  # 0 and 1 pass, as for nn.LSTM
        raise ValueError(f"bidirectional must be True or False, got {bidirectional!r}")
    bidirectional = bool(bidirectional)
    D = 2 if bidirectional else 1
    cells, reverse = [], []
    for k in range(num_layers):
        n_in = input_size if k == 0 else hidden_size * D
        cells.append(make_cell(n_in))
        if bidirectional:
            reverse.append(make_cell(n_in))
    return cells, (reverse if bidirectional else None)


DROP_IN_NOTES = """
    Compatibility with torch.nn.LSTM (checked against its whole public surface):

    * constructor: ``input_size, hidden_size, num_layers, bias, batch_first, dropout,
      bidirectional, proj_size, device, dtype`` in nn.LSTM's positional order; ``proj_size`` must
      be 0 (a ValueError says why); this package's own options follow, by keyword.
    * forward: input (T, B, I), (B, T, I) with ``batch_first``, unbatched (T, I) or a
      PackedSequence; output and final state in nn.LSTM's layout, (T, B, D * H) and
      (num_layers * D, B, size) indexed ``layer * D + direction`` with D = 2 when bidirectional.
      The reverse direction runs each sequence reversed within its own length.
    * attributes ``mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
      bidirectional, proj_size``; ``reset_parameters()``; ``flatten_parameters()`` exists and does
      nothing (there is no cuDNN weight buffer to compact), so scripts that call it after loading
      a model run.
    * differs: parameters live in per-layer cells (``cells.0.weight_ih``; reverse direction
      ``cells_reverse.0.weight_ih``) with gates stacked i, g, f, o and one bias vector, not
      nn.LSTM's ``weight_ih_l0`` (i, f, g, o, two biases); hence no ``all_weights`` or
      ``_flat_weights``, and nn.LSTM state dicts do not load (copy weights as the tests do).
      nn.RNNBase's internal helpers (``check_forward_args``, ``check_input``,
      ``get_expected_hidden_size``, ``permute_hidden``) are not provided: input and state are
      checked where they enter, with a ValueError naming the argument and the expected shape, and
      inputs or states of another dtype than the parameters raise a TypeError naming both.
"""


class LSTM(RecurrentLayers):
    __doc__ = """Multi-layer LSTM with torch.nn.LSTM's constructor and forward contract, plus
    ``layer_norm`` and ``recurrent_dropout`` (and the original code's LayerNorm / init options,
    see ``LSTMCell``).

    ``output, (h_n, c_n) = lstm(input, hx=None)``; input (T, B, I), (B, T, I) when
    ``batch_first``, unbatched (T, I), or a PackedSequence. ``h_n``/``c_n`` are
    (num_layers * num_directions, B, hidden_size) (no batch dimension for unbatched input).
    """ + DROP_IN_NOTES

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, layer_norm: bool = False, recurrent_dropout: float = 0.0,
                 layer_norm_eps: float = 1e-5, layer_norm_bias: bool = True, input_init: str = "uniform"):
        check_positive("input_size", input_size)
        check_positive("hidden_size", hidden_size)
        check_positive("num_layers", num_layers)
        check_projection(proj_size)
        cells, reverse = stack_cells(
            lambda n_in: LSTMCell(n_in, hidden_size, bias=bias, layer_norm=layer_norm,
                                  recurrent_dropout=recurrent_dropout, layer_norm_eps=layer_norm_eps,
                                  layer_norm_bias=layer_norm_bias, input_init=input_init),
            input_size, hidden_size, num_layers, bidirectional)
        super().__init__(cells, batch_first=batch_first, dropout=dropout, reverse_cells=reverse)
        self.bias = bool(bias)
        self.mode = "LSTM"
        self.layer_norm = bool(layer_norm)
        self.recurrent_dropout = float(recurrent_dropout)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

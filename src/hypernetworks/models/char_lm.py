"""Character-level language model over any recurrent cell of ``hypernetworks.nn`` (paper section
"Character-level Penn Treebank" and "Hutter Prize Wikipedia").

Input symbols enter as one-hot vectors (the paper's parameter counts have no embedding table:
LSTM 1000 over 50 symbols = 4*1000*(1000+50) + 4*1000 + 1000*50 + 50 = 4.25M), then input dropout,
the recurrent stack (with recurrent dropout on the candidate inside the cells and dropout between
layers), output dropout, and a linear softmax layer.

Every row of the paper's PTB and enwik8 tables is a registered model at paper size:
``create_model("ptb-hyperlstm")``, ``create_model("enwik8-ln-hyperlstm-2048", vocab_size=256)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hypernetworks.models.registry import register_model
from hypernetworks.nn import build_recurrent


class CharLM(nn.Module):
    """``logits, state = model(x, state)`` with x (B, T) int64 symbol ids; logits (B, T, vocab_size).

    ``hyper_recurrent_dropout`` (None: the main ``recurrent_dropout``), ``z_input``,
    ``layer_norm_eps``, ``layer_norm_bias`` and ``input_init`` are the cells' switches, documented
    on :class:`hypernetworks.nn.HyperLSTMCell`; their defaults are the package's defaults."""

    def __init__(self, vocab_size: int, cell: str = "lstm", hidden_size: int = 1000, num_layers: int = 1,
                 hyper_size: int = 128, embedding_size: int = 4, embedding_dim: int | None = None,
                 input_dropout: float = 0.0, output_dropout: float = 0.0, recurrent_dropout: float = 0.0,
                 layer_dropout: float | None = None, hyper_recurrent_dropout: float | None = None,
                 z_input: str = "current", layer_norm_eps: float = 1e-5, layer_norm_bias: bool = True,
                 input_init: str | None = None) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size <= 1:
            raise ValueError(f"vocab_size must be an integer > 1; got {vocab_size!r}")
        for name, p in (("input_dropout", input_dropout), ("output_dropout", output_dropout),
                        ("recurrent_dropout", recurrent_dropout), ("layer_dropout", layer_dropout),
                        ("hyper_recurrent_dropout", hyper_recurrent_dropout)):
            if p is not None and not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {p!r}")
        if embedding_dim is not None and embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive or None (one-hot); got {embedding_dim!r}")
        self.vocab_size, self.cell = vocab_size, cell
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if embedding_dim else None
        in_size = embedding_dim or vocab_size
        self.input_dropout = nn.Dropout(input_dropout)
        self.rnn = build_recurrent(
            cell, in_size, hidden_size, num_layers, batch_first=True,
            dropout=output_dropout if layer_dropout is None else layer_dropout,
            recurrent_dropout=recurrent_dropout, hyper_size=hyper_size, embedding_size=embedding_size,
            hyper_recurrent_dropout=hyper_recurrent_dropout, z_input=z_input, layer_norm_eps=layer_norm_eps,
            layer_norm_bias=layer_norm_bias, input_init=input_init)
        self.output_dropout = nn.Dropout(output_dropout)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"x must hold integer symbol ids; got dtype {x.dtype}")
        if self.embedding is not None:
            e = self.embedding(x)
        else:
            e = F.one_hot(x.long(), self.vocab_size).to(self.decoder.weight.dtype)
        return self.input_dropout(e)

    def forward(self, x: torch.Tensor, state=None):
        out, state = self.rnn(self._embed(x), state)
        return self.decoder(self.output_dropout(out)), state

    def forward_with_activity(self, x: torch.Tensor, state=None):
        """As forward, plus the recurrent stack's per-layer activity dicts (see hypernetworks.nn)."""
        out, state, activity = self.rnn.forward_with_activity(self._embed(x), state)
        return self.decoder(self.output_dropout(out)), state, activity

    def forward_with_states(self, x: torch.Tensor, state=None):
        """Run one step at a time and also return the last layer's h and c at every step,
        (B, T, hidden) each, for the saturation analysis."""
        hs, cs, logits = [], [], []
        for t in range(x.shape[1]):
            lg, state = self(x[:, t:t + 1], state)
            logits.append(lg)
            hs.append(state[0][-1])
            cs.append(state[1][-1])
        return torch.cat(logits, 1), state, torch.stack(hs, 1), torch.stack(cs, 1)


# ----------------------------------------------------------------------------- paper-size rows

# name -> (vocab size, CharLM settings); dropout = 1 - keep probability of the paper.
PTB = dict(hyper_size=128, embedding_size=4, input_dropout=0.1, output_dropout=0.1, recurrent_dropout=0.1)
ENWIK8 = dict(hyper_size=256, embedding_size=64, input_dropout=0.0, output_dropout=0.0, recurrent_dropout=0.1)

PAPER_MODELS: dict[str, tuple[int, dict]] = {
    "ptb-lstm-1000": (50, dict(PTB, cell="lstm", hidden_size=1000)),
    "ptb-lstm-1250": (50, dict(PTB, cell="lstm", hidden_size=1250)),
    "ptb-2layer-lstm-1000": (50, dict(PTB, cell="lstm", hidden_size=1000, num_layers=2)),
    "ptb-ln-lstm-1000": (50, dict(PTB, cell="ln-lstm", hidden_size=1000)),
    "ptb-hyperlstm": (50, dict(PTB, cell="hyperlstm", hidden_size=1000)),
    "ptb-ln-hyperlstm": (50, dict(PTB, cell="ln-hyperlstm", hidden_size=1000)),
    "ptb-ln-hyperlstm-nz16": (50, dict(PTB, cell="ln-hyperlstm", hidden_size=1000, embedding_size=16,
                                       input_dropout=0.15, output_dropout=0.15, recurrent_dropout=0.15)),
    # N_z 16 (the large embedding of the row above) is inferred from the paper's count: it gives
    # 14,407,714 parameters = 14.41M, N_z 4 gives 14.08M (docs/char_lm.md, "Parameter counts").
    "ptb-2layer-ln-hyperlstm": (50, dict(PTB, cell="ln-hyperlstm", hidden_size=1000, num_layers=2,
                                         embedding_size=16, input_dropout=0.2, output_dropout=0.2,
                                         recurrent_dropout=0.2)),
    "enwik8-lstm-1800": (205, dict(ENWIK8, cell="lstm", hidden_size=1800, recurrent_dropout=0.0)),
    "enwik8-ln-lstm-1800": (205, dict(ENWIK8, cell="ln-lstm", hidden_size=1800)),
    "enwik8-hyperlstm-1800": (205, dict(ENWIK8, cell="hyperlstm", hidden_size=1800)),
    "enwik8-ln-hyperlstm-1800": (205, dict(ENWIK8, cell="ln-hyperlstm", hidden_size=1800)),
    "enwik8-ln-hyperlstm-2048": (205, dict(ENWIK8, cell="ln-hyperlstm", hidden_size=2048, hyper_size=512,
                                           hyper_recurrent_dropout=0.15)),
}

# The paper's reported parameter counts (millions), for `hypernetworks params` and the docs.
PAPER_PARAMS_M = {
    "ptb-lstm-1000": 4.25, "ptb-lstm-1250": 6.57, "ptb-2layer-lstm-1000": 12.26, "ptb-ln-lstm-1000": 4.26,
    "ptb-hyperlstm": 4.91, "ptb-ln-hyperlstm": 4.92, "ptb-ln-hyperlstm-nz16": 5.06,
    "ptb-2layer-ln-hyperlstm": 14.41, "enwik8-lstm-1800": 14.81, "enwik8-ln-lstm-1800": 14.82,
    "enwik8-hyperlstm-1800": 18.71, "enwik8-ln-hyperlstm-1800": 18.78, "enwik8-ln-hyperlstm-2048": 26.54,
}


def paper_settings(name: str) -> dict:
    """CharLM keyword arguments (vocab_size included) of a paper row."""
    vocab, kw = PAPER_MODELS[name]
    return dict(kw, vocab_size=vocab)


def _factory(name: str):
    def build(**overrides) -> CharLM:
        return CharLM(**{**paper_settings(name), **overrides})

    build.__doc__ = f"Paper-size char LM {name!r} (paper: {PAPER_PARAMS_M[name]}M parameters)."
    return build


for _name in PAPER_MODELS:
    register_model(_name)(_factory(_name))

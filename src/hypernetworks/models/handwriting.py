"""Graves' handwriting model: a recurrent stack driving a mixture density network over pen offsets.

At each step the network reads ``(dx, dy, pen_up)`` and outputs the parameters of the next offset's
distribution (Graves 2013, eqs. 15-26): ``M`` bivariate Gaussians (weights, means, standard
deviations, correlations) for ``(dx, dy)`` and a Bernoulli for the end-of-stroke bit. The recurrent
stack is any :func:`hypernetworks.nn.build_recurrent` cell (LSTM, LN LSTM, HyperLSTM, LN HyperLSTM),
so the HyperLSTM runs "a model generating a model generating a model" (the paper's IAM table).

Registered at the paper's sizes (parameter counts; the paper's in brackets):
``iam-lstm-900`` (3.36M), ``iam-ln-lstm-900`` (3.37M), ``iam-2layer-lstm-650`` (5.16M),
``iam-hyperlstm-900`` (3.94M), ``iam-ln-hyperlstm-900`` (3.95M); ``hypernetworks params`` prints them.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hypernetworks.models.registry import register_model
from hypernetworks.nn import build_recurrent, gate_change_intensity

LOG_2PI = math.log(2 * math.pi)


class MDNParams(NamedTuple):
    """Mixture parameters for each step: leading dims ``(...)`` are batch/time."""

    logit_pi: torch.Tensor  # (..., M) unnormalised mixture weights
    mu: torch.Tensor  # (..., M, 2)
    log_sigma: torch.Tensor  # (..., M, 2)
    rho: torch.Tensor  # (..., M) correlation in (-1, 1)
    eos_logit: torch.Tensor  # (...) logit of pen_up = 1


def mdn_nll(p: MDNParams, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood in nats of ``target`` ``(..., 3)`` under ``p``: returns ``(...)``.

    -log( sum_j pi_j N(dx, dy | mu_j, sigma_j, rho_j) ) - log Bernoulli(pen_up | e).
    """
    xy = target[..., None, :2]  # (..., 1, 2) against (..., M, 2)
    z = (xy - p.mu) * torch.exp(-p.log_sigma)
    one_m_rho2 = (1 - p.rho.square()).clamp_min(1e-6)  # keeps log finite when |rho| -> 1
    quad = (z[..., 0].square() + z[..., 1].square() - 2 * p.rho * z[..., 0] * z[..., 1]) / one_m_rho2
    log_n = -LOG_2PI - p.log_sigma.sum(-1) - 0.5 * torch.log(one_m_rho2) - 0.5 * quad
    log_mix = torch.logsumexp(F.log_softmax(p.logit_pi, dim=-1) + log_n, dim=-1)
    eos = F.binary_cross_entropy_with_logits(p.eos_logit, target[..., 2], reduction="none")
    return eos - log_mix


def sample_mdn(p: MDNParams, bias: float = 0.0, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one ``(dx, dy, pen_up)`` per leading index from ``p`` (shapes ``(B, ...)`` -> ``(B, 3)``).

    ``bias`` is Graves' sampling bias (sharper mixture weights and narrower Gaussians, eqs. 61-62);
    ``temperature`` scales the mixture / Bernoulli logits by ``1/temperature`` and the covariances by
    ``temperature``: both make samples neater as bias grows or temperature shrinks.
    """
    if bias < 0:
        raise ValueError(f"bias must be >= 0, got {bias}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = p.logit_pi * (1 + bias) / temperature
    k = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(-1)  # (B,)
    rows = torch.arange(len(k), device=k.device)
    mu, log_sigma, rho = p.mu[rows, k], p.log_sigma[rows, k], p.rho[rows, k]  # the chosen component
    sigma = torch.exp(log_sigma - bias) * math.sqrt(temperature)
    e = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    dx = mu[:, 0] + sigma[:, 0] * e[:, 0]
    dy = mu[:, 1] + sigma[:, 1] * (rho * e[:, 0] + torch.sqrt((1 - rho.square()).clamp_min(0)) * e[:, 1])
    u = torch.rand(dx.shape, generator=generator, dtype=dx.dtype, device=dx.device)
    pen = (u < torch.sigmoid(p.eos_logit / temperature)).to(dx.dtype)
    return torch.stack([dx, dy, pen], dim=-1)


class HandwritingMDN(nn.Module):
    """Recurrent stack + mixture density head over ``(dx, dy, pen_up)``.

    Args:
        cell: ``"lstm"``, ``"ln-lstm"``, ``"hyperlstm"`` or ``"ln-hyperlstm"``.
        hidden_size, num_layers: the recurrent stack (the paper: 900 units, or 2 x 650).
        num_mixtures: Gaussians in the mixture (Graves / the paper: 20).
        hyper_size, embedding_size: HyperLSTM sizes (the paper: 128 and N_z = 4).
        dropout: between stacked layers; recurrent_dropout: on the candidate (paper keep 0.95).
        hyper_recurrent_dropout, z_input, layer_norm_eps, layer_norm_bias, input_init: the cells'
            switches (see :class:`hypernetworks.nn.HyperLSTMCell`); None / defaults keep the package's.
    """

    def __init__(self, cell: str = "lstm", hidden_size: int = 900, num_layers: int = 1, num_mixtures: int = 20,
                 hyper_size: int = 128, embedding_size: int = 4, dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, input_size: int = 3, hyper_recurrent_dropout: float | None = None,
                 z_input: str = "current", layer_norm_eps: float = 1e-5, layer_norm_bias: bool = True,
                 input_init: str | None = None):
        super().__init__()
        if num_mixtures < 1:
            raise ValueError(f"num_mixtures must be >= 1, got {num_mixtures}")
        self.cell, self.num_mixtures = cell, num_mixtures
        self.rnn = build_recurrent(cell, input_size, hidden_size, num_layers, batch_first=True, dropout=dropout,
                                   recurrent_dropout=recurrent_dropout, hyper_size=hyper_size,
                                   embedding_size=embedding_size, hyper_recurrent_dropout=hyper_recurrent_dropout,
                                   z_input=z_input, layer_norm_eps=layer_norm_eps, layer_norm_bias=layer_norm_bias,
                                   input_init=input_init)
        self.head = nn.Linear(hidden_size, 6 * num_mixtures + 1)

    @property
    def is_hyper(self) -> bool:
        return self.cell.endswith("hyperlstm")

    def mdn_params(self, h: torch.Tensor) -> MDNParams:
        M = self.num_mixtures
        out = self.head(h)
        logit_pi, mu, log_sigma, rho, eos = out.split([M, 2 * M, 2 * M, M, 1], dim=-1)
        return MDNParams(logit_pi, mu.unflatten(-1, (M, 2)), log_sigma.unflatten(-1, (M, 2)), torch.tanh(rho),
                         eos.squeeze(-1))

    def forward(self, x: torch.Tensor, state=None) -> tuple[MDNParams, tuple]:
        """``x`` (B, T, 3) -> MDN parameters with leading dims (B, T), and the recurrent state."""
        h, state = self.rnn(x, state)
        return self.mdn_params(h), state

    def forward_with_activity(self, x: torch.Tensor, state=None):
        h, state, activity = self.rnn.forward_with_activity(x, state)
        return self.mdn_params(h), state, activity

    @torch.no_grad()
    def sample(self, length: int, bias: float = 0.0, temperature: float = 1.0,
               generator: torch.Generator | None = None, activity: bool = False):
        """Generate ``length`` normalised offsets, starting from the zero "begin" row.

        Returns ``(steps (length, 3), intensity (length, 4) or None)``; intensity is
        :func:`gate_change_intensity` of the first layer's ``d_h`` (only for HyperLSTM cells).
        """
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        p0 = next(self.parameters())
        x = torch.zeros(1, 1, 3, dtype=p0.dtype, device=p0.device)
        state, steps, d_hs = None, [], []
        record = activity and self.is_hyper
        for _ in range(length):
            if record:
                p, state, act = self.forward_with_activity(x, state)
                d_hs.append(act[0]["d_h"])  # (1, 1, 4, H)
            else:
                p, state = self(x, state)
            p = MDNParams(*(t[:, -1] for t in p))
            x = sample_mdn(p, bias, temperature, generator).view(1, 1, 3)
            steps.append(x.view(3))
        intensity = gate_change_intensity(torch.cat(d_hs))[:, 0] if record else None
        return torch.stack(steps), intensity


def _factory(cell: str, hidden_size: int, num_layers: int = 1):
    def build(**overrides) -> HandwritingMDN:
        kw = dict(cell=cell, hidden_size=hidden_size, num_layers=num_layers)
        kw.update(overrides)
        return HandwritingMDN(**kw)

    return build


PAPER_SIZES = {  # name -> (cell, hidden, layers, the paper's parameter count)
    "iam-lstm-900": ("lstm", 900, 1, 3.36e6),
    "iam-ln-lstm-900": ("ln-lstm", 900, 1, 3.37e6),
    "iam-2layer-lstm-650": ("lstm", 650, 2, 5.16e6),
    "iam-hyperlstm-900": ("hyperlstm", 900, 1, 3.94e6),
    "iam-ln-hyperlstm-900": ("ln-hyperlstm", 900, 1, 3.95e6),
}
for _name, (_cell, _hidden, _layers, _) in PAPER_SIZES.items():
    register_model(_name)(_factory(_cell, _hidden, _layers))

"""Slow, literal implementations of the paper's equations, one gate at a time.

They read the modules' parameters but none of their code, so the fast paths of
hypernetworks.nn are checked against the equations as written in ../shared/PAPER.md.
"""
from __future__ import annotations

import torch

GATES = "igfo"


def _ln(a, weight, bias, eps=1e-5):
    mu = a.mean(-1, keepdim=True)
    var = a.var(-1, unbiased=False, keepdim=True)
    return (a - mu) / torch.sqrt(var + eps) * weight + bias


def _ref_state_update(cell, pre: dict, c):
    """c_t = sigma(f) c_{t-1} + sigma(i) tanh(g); h_t = sigma(o) tanh(LN(c_t))."""
    c = torch.sigmoid(pre["f"]) * c + torch.sigmoid(pre["i"]) * torch.tanh(pre["g"])
    cn = _ln(c, cell.cell_norm.weight, cell.cell_norm.bias) if cell.cell_norm is not None else c
    h = torch.sigmoid(pre["o"]) * torch.tanh(cn)
    return h, c


def ref_lstm_step(cell, x, h, c):
    """Plain (optionally layer-normed) LSTM step, gate by gate (order i, g, f, o)."""
    H = cell.hidden_size
    pre = {}
    for k, y in enumerate(GATES):
        rows = slice(k * H, (k + 1) * H)
        a = x @ cell.weight_ih[rows].T + h @ cell.weight_hh[rows].T
        if cell.bias is not None:
            a = a + cell.bias[rows]
        if cell.gate_norm is not None:
            a = _ln(a, cell.gate_norm.weight[k], cell.gate_norm.bias[k])
        pre[y] = a
    return _ref_state_update(cell, pre, c)


def ref_hyper_lstm_step(cell, x, h, c, h_hat, c_hat):
    """The HyperLSTM step exactly as PAPER.md writes it, per gate y in {i, g, f, o}."""
    H, Nz = cell.hidden_size, cell.embedding_size
    # 1. the hyper LSTM reads x_hat = [h_{t-1}; x_t] and steps first
    h_hat, c_hat = ref_lstm_step(cell.hyper, torch.cat([h, x], -1), h_hat, c_hat)
    s = cell.scaling
    pre = {}
    for k, y in enumerate(GATES):
        W_hz = s.z_weight[k * Nz:(k + 1) * Nz]
        b_hz = s.z_bias[k * Nz:(k + 1) * Nz]
        W_xz = s.z_weight[4 * Nz + k * Nz:4 * Nz + (k + 1) * Nz]
        b_xz = s.z_bias[4 * Nz + k * Nz:4 * Nz + (k + 1) * Nz]
        W_bz = s.z_weight[8 * Nz + k * Nz:8 * Nz + (k + 1) * Nz]
        z_h = h_hat @ W_hz.T + b_hz
        z_x = h_hat @ W_xz.T + b_xz
        z_b = h_hat @ W_bz.T
        d_h = z_h @ s.d_weight[0, k].T
        d_x = z_x @ s.d_weight[1, k].T
        b = z_b @ s.d_weight[2, k].T
        if s.bias is not None:
            b = b + s.bias[k * H:(k + 1) * H]
        W_h = cell.weight_hh[k * H:(k + 1) * H]
        W_x = cell.weight_ih[k * H:(k + 1) * H]
        a = d_h * (h @ W_h.T) + d_x * (x @ W_x.T) + b
        if cell.gate_norm is not None:
            a = _ln(a, cell.gate_norm.weight[k], cell.gate_norm.bias[k])
        pre[y] = a
    h, c = _ref_state_update(cell, pre, c)
    return h, c, h_hat, c_hat


def ref_hyper_rnn_step(cell, x, h, h_hat):
    Nz = cell.embedding_size
    r = cell.hyper
    h_hat = torch.tanh(torch.cat([h, x], -1) @ r.weight_ih.T + r.bias_ih + h_hat @ r.weight_hh.T + r.bias_hh)
    s = cell.scaling
    z_h = h_hat @ s.z_weight[:Nz].T + s.z_bias[:Nz]
    z_x = h_hat @ s.z_weight[Nz:2 * Nz].T + s.z_bias[Nz:]
    z_b = h_hat @ s.z_weight[2 * Nz:].T
    b = z_b @ s.d_weight[2, 0].T + (s.bias if s.bias is not None else 0)
    h = torch.tanh((z_h @ s.d_weight[0, 0].T) * (h @ cell.weight_hh.T)
                   + (z_x @ s.d_weight[1, 0].T) * (x @ cell.weight_ih.T) + b)
    return h, h_hat


def ref_layers(module, x, hyper: bool):
    """Run a (Hyper)LSTM stack over time-major x (T, B, I) with zero initial state, no dropout."""
    T, B, _ = x.shape
    finals = []
    for cell in module.cells:
        h = x.new_zeros(B, cell.hidden_size)
        c = torch.zeros_like(h)
        if hyper:
            hh = x.new_zeros(B, cell.hyper_size)
            hc = torch.zeros_like(hh)
        outs = []
        for t in range(T):
            if hyper:
                h, c, hh, hc = ref_hyper_lstm_step(cell, x[t], h, c, hh, hc)
            else:
                h, c = ref_lstm_step(cell, x[t], h, c)
            outs.append(h)
        x = torch.stack(outs)
        finals.append((h, c, hh, hc) if hyper else (h, c))
    return x, tuple(torch.stack(p) for p in zip(*finals))


def torch_lstm_weights_to_igfo(w: torch.Tensor) -> torch.Tensor:
    """Reorder PyTorch's stacked gates (i, f, g, o) into this package's (i, g, f, o)."""
    i, f, g, o = w.chunk(4, 0)
    return torch.cat([i, g, f, o], 0)


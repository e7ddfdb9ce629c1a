"""Slow, literal implementations of the paper's equations, one gate at a time.

They read the modules' parameters but none of their code, so the fast paths of
hypernetworks.nn are checked against the equations as written in ../shared/PAPER.md.
"""
from __future__ import annotations

import torch

GATES = "igfo"


def _ln(a, weight, bias, eps=1e-5):
    """LN(a) = gain * (a - mean) / sqrt(var + eps) + bias; bias None: gain only (original code)."""
    mu = a.mean(-1, keepdim=True)
    var = a.var(-1, unbiased=False, keepdim=True)
    out = (a - mu) / torch.sqrt(var + eps) * weight
    return out if bias is None else out + bias


def _gate_ln(cell, a, k):
    """Gate k's norm; a gain-only norm adds the constant forget bias +1 after it (original code)."""
    norm = cell.gate_norm
    out = _ln(a, norm.weight[k], None if norm.bias is None else norm.bias[k], norm.eps)
    return out + 1.0 if norm.bias is None and GATES[k] == "f" else out


def _ref_state_update(cell, pre: dict, c):
    """c_t = sigma(f) c_{t-1} + sigma(i) tanh(g); h_t = sigma(o) tanh(LN(c_t))."""
    c = torch.sigmoid(pre["f"]) * c + torch.sigmoid(pre["i"]) * torch.tanh(pre["g"])
    n = cell.cell_norm
    cn = _ln(c, n.weight, n.bias, n.eps) if n is not None else c
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
            a = _gate_ln(cell, a, k)
        pre[y] = a
    return _ref_state_update(cell, pre, c)


def ref_hyper_lstm_step(cell, x, h, c, h_hat, c_hat):
    """The HyperLSTM step exactly as PAPER.md writes it, per gate y in {i, g, f, o}.

    The z projections read h_hat_t (``z_input="current"``) or h_hat_{t-1} (``"previous"``)."""
    H, Nz = cell.hidden_size, cell.embedding_size
    h_hat_prev = h_hat
    # 1. the hyper LSTM reads x_hat = [h_{t-1}; x_t] and steps first
    h_hat, c_hat = ref_lstm_step(cell.hyper, torch.cat([h, x], -1), h_hat, c_hat)
    z_in = h_hat if getattr(cell, "z_input", "current") == "current" else h_hat_prev
    s = cell.scaling
    pre = {}
    for k, y in enumerate(GATES):
        W_hz = s.z_weight[k * Nz:(k + 1) * Nz]
        b_hz = s.z_bias[k * Nz:(k + 1) * Nz]
        W_xz = s.z_weight[4 * Nz + k * Nz:4 * Nz + (k + 1) * Nz]
        b_xz = s.z_bias[4 * Nz + k * Nz:4 * Nz + (k + 1) * Nz]
        W_bz = s.z_weight[8 * Nz + k * Nz:8 * Nz + (k + 1) * Nz]
        z_h = z_in @ W_hz.T + b_hz
        z_x = z_in @ W_xz.T + b_xz
        z_b = z_in @ W_bz.T
        d_h = z_h @ s.d_weight[0, k].T
        d_x = z_x @ s.d_weight[1, k].T
        b = z_b @ s.d_weight[2, k].T
        if s.bias is not None:
            b = b + s.bias[k * H:(k + 1) * H]
        W_h = cell.weight_hh[k * H:(k + 1) * H]
        W_x = cell.weight_ih[k * H:(k + 1) * H]
        a = d_h * (h @ W_h.T) + d_x * (x @ W_x.T) + b
        if cell.gate_norm is not None:
            a = _gate_ln(cell, a, k)
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


def _ref_run(cell, x, hyper: bool):
    """One cell over one unbatched sequence x (T, I) from zero state -> (outputs (T, H), final state)."""
    h = x.new_zeros(1, cell.hidden_size)
    state = (h, torch.zeros_like(h)) + ((x.new_zeros(1, cell.hyper_size),) * 2 if hyper else ())
    outs = []
    for t in range(x.size(0)):
        step = ref_hyper_lstm_step if hyper else ref_lstm_step
        state = step(cell, x[t:t + 1], *state)
        outs.append(state[0][0])
    return torch.stack(outs), tuple(s[0] for s in state)


def ref_bidirectional(module, seqs, hyper: bool):
    """A bidirectional stack over a list of unbatched sequences, each on its own (no padding):
    the forward cell reads the sequence, the reverse cell reads it reversed and its outputs are
    reversed back; layer k + 1 reads both halves. Returns per sequence (outputs (T, 2H), final
    state tuple of (2 * num_layers, size) tensors in nn.LSTM's layer * 2 + direction order)."""
    results = []
    for x in seqs:
        finals = []
        for fwd, bwd in zip(module.cells, module.cells_reverse):
            out_f, fin_f = _ref_run(fwd, x, hyper)
            out_b, fin_b = _ref_run(bwd, x.flip(0), hyper)
            x = torch.cat([out_f, out_b.flip(0)], dim=-1)
            finals += [fin_f, fin_b]
        results.append((x, tuple(torch.stack(p) for p in zip(*finals))))
    return results


def torch_lstm_weights_to_igfo(w: torch.Tensor) -> torch.Tensor:
    """Reorder PyTorch's stacked gates (i, f, g, o) into this package's (i, g, f, o)."""
    i, f, g, o = w.chunk(4, 0)
    return torch.cat([i, g, f, o], 0)


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

import ctypes
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from hypernetworks.nn import _fused, _kernels
from hypernetworks.nn._sequence import RecurrentLayers, run_cell
from hypernetworks.nn.lstm import (DROP_IN_NOTES, GateLayerNorm, LSTM, LSTMCell, check_choice, check_eps,
                                   check_positive, check_probability, check_projection, init_input_weight_,
                                   lstm_update, orthogonal_per_gate_, reset_norms_, stack_cells)

# The paper's initial weight scale: every d starts at this value (as in recurrent batch norm).
INITIAL_SCALE = 0.1
# Which hyper state the z projections read: h_hat_t ("current", the original TensorFlow code and
# this package's default) or h_hat_{t-1} ("previous", the paper's equations as printed).
Z_INPUTS = ("current", "previous")
# The paper's hyper size: 128 units next to main cells of 1000 (PTB), 900 (IAM) and more.
PAPER_HYPER_SIZE = 128


def default_hyper_size(hidden_size: int) -> int:
    """The hyper size used when none is given: a quarter of the main cell, at least 1 and at most
    the paper's 128, so never larger than the main cell (hidden 51 -> 12, 128 -> 32, 1000 -> 128).
    The paper's recipes (configs/, the models' presets) state their sizes explicitly."""
    return max(1, min(PAPER_HYPER_SIZE, check_positive("hidden_size", hidden_size) // 4))


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


# -- the single-step path of HyperLSTMCell.forward -------------------------------------------
# A step loop written for nn.LSTMCell calls the cell once per time step, so what a step costs is
# mostly per-op overhead: the eager ``step`` records ~50 autograd ops. ``_HyperStep`` is one
# autograd Function for the whole step (main and hyper LSTM, no layer norm, no active recurrent
# dropout) without autograd bookkeeping inside: on CPU in float32/float64 its elementwise work
# runs in the package's compiled step kernels (``_kernels``: the two LSTM updates and the scaled
# pre-activations, forward and backward), around five matrix products each way; elsewhere (CUDA,
# no compiler) in ~25 PyTorch ops forward and ~45 backward. Nothing is cached between calls (a
# cache keyed on version counters would miss ``p.data`` writes). Results equal the eager
# ``step`` to rounding (tests/test_hyper_lstm.py compares both paths, gradients included); a
# backward that builds a graph (double backward) recomputes the step with the eager ops and
# differentiates that.
def _step_params(cell: "HyperLSTMCell") -> tuple:
    """The parameters ``_HyperStep`` reads, in its argument order (``scaling.bias`` may be None)."""
    hyper, sc = cell.hyper, cell.scaling
    return (cell.weight_ih, cell.weight_hh, hyper.weight_ih, hyper.weight_hh, hyper.bias,
            sc.z_weight, sc.z_bias, sc.d_weight, sc.bias)


def _lstm_gates_forward(pre: torch.Tensor, c: torch.Tensor | None, dim: int):
    """One plain LSTM update from pre-activations ``pre`` whose dimension ``dim`` holds the gates
    i, g, f, o: (activations, tanh(c'), c', h'); ``c`` None is a zero cell."""
    acts = torch.sigmoid(pre)
    i, g, f, o = acts.unbind(dim)
    torch.tanh(pre.select(dim, 1), out=g)
    c_new = i * g if c is None else torch.addcmul(f * c, i, g)
    tc = torch.tanh(c_new)
    return acts, tc, c_new, o * tc


_aten = torch.ops.aten


def _lstm_gates_backward(dh: torch.Tensor, dc: torch.Tensor, acts, tc, c, dim: int, out: torch.Tensor):
    """Backward of ``_lstm_gates_forward``: the pre-activations' gradient written into ``out``
    (shaped like ``acts``); returns the gradient of c."""
    i, g, f, o = acts.unbind(dim)
    dc = dc + _aten.tanh_backward(dh * o, tc)
    d_g = _aten.tanh_backward(dc * i, g)
    torch.stack([dc * g, d_g, dc * c if c is not None else torch.zeros_like(dc), dh * tc], dim, out=out)
    _aten.sigmoid_backward.grad_input(out, acts, grad_input=out)
    out.select(dim, 1).copy_(d_g)  # g went through tanh, not sigmoid
    return dc * f


def _step_kernels(x: torch.Tensor):
    """The package's compiled CPU step kernels (``hypernetworks.nn._kernels``, the ABI this file
    calls) for tensors like ``x``, or None: CUDA, other dtypes, no compiler, HYPERNETWORKS_KERNELS=0."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or _kernels.ABI_VERSION != 2:
        return None
    lib = _kernels.library()
    if lib is None:
        return None
    sfx = "f32" if x.dtype == torch.float32 else "f64"
    return tuple(getattr(lib, f"{name}_{sfx}") for name in ("cell_fwd", "cell_bwd", "hyper_pre_fwd", "hyper_pre_bwd"))


def _kernel_cell_fwd(fn, pre: torch.Tensor, c_prev: torch.Tensor):
    """One plain LSTM update in the compiled kernel, pre (B, 4S) contiguous: (activations
    [i, tanh g, f, o] (B, 4S), c', h')."""
    B, S = c_prev.shape
    act, c_new, h_new = pre.new_empty(B, 4 * S), pre.new_empty(B, S), pre.new_empty(B, S)
    fn(B, S, pre.data_ptr(), pre.stride(0), None, 0, None, 0, None, None, None, None, 0.0, None, c_prev.data_ptr(),
       act.data_ptr(), c_new.data_ptr(), h_new.data_ptr(), S, None, None, None, None, None)
    return act, c_new, h_new


def _kernel_cell_bwd(fn, dh: torch.Tensor, dc: torch.Tensor, act, c_prev, c_new):
    """Backward of ``_kernel_cell_fwd``: (d pre (B, 4S), d c_prev)."""
    B, S = c_prev.shape
    dpre, dc_prev = act.new_empty(B, 4 * S), act.new_empty(B, S)
    fn(B, S, dh.data_ptr(), None, dc.data_ptr(), act.data_ptr(), c_prev.data_ptr(), c_new.data_ptr(), None, None,
       None, None, None, None, None, None, dpre.data_ptr(), 4 * S, dc_prev.data_ptr(), None, None, None, None)
    return dpre, dc_prev


def _step_forward_kernels(ctx, kernels, cell, x, h, c_in, hh_in, ch_in, params):
    """``_HyperStep.forward`` with the compiled kernels: three products (the hyper LSTM's, W_h h,
    W_x x) and z, then one kernel call each for the hyper LSTM update, the scaled pre-activations
    and the main LSTM update."""
    cell_fwd, _, pre_fwd, _ = kernels
    H, Hh, Nz = cell.hidden_size, cell.hyper_size, cell.embedding_size
    w_ih, w_hh, hw_ih, hw_hh, hb, zw, zb, dw, b0 = params
    B = x.size(0)
    if hh_in is None:
        inp, w_inp = torch.cat([h, x], 1), hw_ih
    else:
        inp, w_inp = torch.cat([h, x, hh_in], 1), torch.cat([hw_ih, hw_hh], 1)
    ch_prev = x.new_zeros(B, Hh) if ch_in is None else ch_in.contiguous()
    hacts, ch_new, hh_new = _kernel_cell_fwd(cell_fwd, F.linear(inp, w_inp, hb), ch_prev)
    z = F.linear(hh_new, zw)                         # (B, 3, 4, Nz): z_h, z_x, z_b
    z[:, :8 * Nz] += zb
    a, xw = F.linear(h, w_hh), F.linear(x, w_ih)     # W_h h, W_x x
    wd = dw.transpose(-1, -2).contiguous()           # (3, 4, Nz, H)
    bias = x.new_zeros(4 * H) if b0 is None else b0.contiguous()
    pre = x.new_empty(B, 4 * H)
    pre_fwd(B, H, Nz, a.data_ptr(), a.stride(0), xw.data_ptr(), z.data_ptr(), wd.data_ptr(), bias.data_ptr(),
            pre.data_ptr())
    c_prev = c_in.contiguous()
    acts, c_new, h_new = _kernel_cell_fwd(cell_fwd, pre, c_prev)
    ctx.inter = (inp, w_inp, a, xw, z, wd, hacts, ch_prev, ch_new, hh_new, acts, c_prev, c_new)
    return h_new, torch.cat([c_new, hh_new, ch_new], 1)


def _step_backward_kernels(ctx, kernels, x, h, hh, params, dh_new, dc_ext):
    _, cell_bwd, _, pre_bwd = kernels
    cell = ctx.cell
    H, Hh, Nz = cell.hidden_size, cell.hyper_size, cell.embedding_size
    inp, w_inp, a, xw, z, wd, hacts, ch_prev, ch_new, hh_new, acts, c_prev, c_new = ctx.inter
    w_ih, w_hh, _, hw_hh, _, zw, _, _, b0 = params
    B, I = x.shape
    dc, dhh, dch = dc_ext.split([H, Hh, Hh], 1)
    dpre, dc_prev = _kernel_cell_bwd(cell_bwd, dh_new.contiguous(), dc.contiguous(), acts, c_prev, c_new)
    d_a, d_xw, dz = x.new_empty(B, 4 * H), x.new_empty(B, 4 * H), x.new_empty(B, 12 * Nz)
    g_wd = x.new_zeros(3, 4, Nz, H)
    g_bias = None if b0 is None else x.new_zeros(4 * H)
    pre_bwd(B, H, Nz, dpre.data_ptr(), a.data_ptr(), a.stride(0), xw.data_ptr(), z.data_ptr(), wd.data_ptr(),
            d_a.data_ptr(), 4 * H, d_xw.data_ptr(), dz.data_ptr(), g_wd.data_ptr(),
            None if g_bias is None else g_bias.data_ptr())
    dhh = torch.addmm(dhh, dz, zw)
    dhpre, dch_prev = _kernel_cell_bwd(cell_bwd, dhh, dch.contiguous(), hacts, ch_prev, ch_new)
    d_inp = dhpre.mm(w_inp)
    g_inp = dhpre.t().mm(inp)
    need = ctx.needs_input_grad
    dx = torch.addmm(d_inp[:, H:H + I], d_xw, w_ih) if need[1] else None
    dh = torch.addmm(d_inp[:, :H], d_a, w_hh) if need[2] else None
    dhh_prev = None if hh is None else d_inp[:, H + I:]
    param_grads = (d_xw.t().mm(x), d_a.t().mm(h), g_inp[:, :H + I],
                   torch.zeros_like(hw_hh) if hh is None else g_inp[:, H + I:],
                   dhpre.sum(0), dz.t().mm(hh_new), dz[:, :8 * Nz].sum(0), g_wd.transpose(-1, -2).contiguous(),
                   g_bias)
    return dx, dh, dc_prev, dhh_prev, dch_prev, param_grads


# -- one step in one call each way (the compiled library with torch's BLAS) ----------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dimension (rows may have any stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _step_struct(cell, x: torch.Tensor, params, ws: torch.Tensor) -> "_kernels.HyperStep":
    w_ih, w_hh, hw_ih, hw_hh, hb, zw, zb, dw, b0 = params
    return _kernels.HyperStep(x.size(0), x.size(1), cell.hidden_size, cell.hyper_size, cell.embedding_size,
                              *(_kernels.ptr(p) for p in (w_ih, w_hh, hw_ih, hw_hh, hb, zw, zb, dw, b0)), ws.data_ptr())


def _step_forward_c(ctx, lib, cell, x, h, c_in, hh_in, ch_in, params):
    """``_HyperStep.forward`` as one call into the library (``hyper_step_fwd``): every product of the
    step in torch's BLAS and the elementwise work in the kernels; the step's intermediates go into one
    work buffer that backward reads."""
    H, Hh = cell.hidden_size, cell.hyper_size
    B = x.size(0)
    params = tuple(None if p is None else p.contiguous() for p in params)
    x, h, c_in = x.contiguous(), h.contiguous(), _rows(c_in)
    hh_in, ch_in = (None if t is None else _rows(t) for t in (hh_in, ch_in))
    ws = x.new_empty(lib.hyper_step_ws_size(B, H, Hh, cell.embedding_size))
    h_new, c_ext = x.new_empty(B, H), x.new_empty(B, H + 2 * Hh)
    st = _step_struct(cell, x, params, ws)
    fn = lib.hyper_step_fwd_f32 if x.dtype == torch.float32 else lib.hyper_step_fwd_f64
    fn(ctypes.byref(st), x.data_ptr(), h.data_ptr(), c_in.data_ptr(), c_in.stride(0), _kernels.ptr(hh_in),
       0 if hh_in is None else hh_in.stride(0), _kernels.ptr(ch_in), 0 if ch_in is None else ch_in.stride(0),
       h_new.data_ptr(), c_ext.data_ptr())
    ctx.ws = ws  # an intermediate: may live on ctx (x, h and the parameters are saved tensors)
    return h_new, c_ext


def _step_backward_c(ctx, x, h, params, dh_new, dc_ext):
    """``_HyperStep.backward`` as one call (``hyper_step_bwd``): (dx, dh, [dc, dh_hat, dc_hat] as one
    (B, H + 2 Hh) tensor, the parameters' gradients)."""
    lib, ws, cell = ctx.lib, ctx.ws, ctx.cell
    x, h = x.contiguous(), h.contiguous()
    params = tuple(None if p is None else p.contiguous() for p in params)
    B, I = x.shape
    H, Hh = cell.hidden_size, cell.hyper_size
    need = ctx.needs_input_grad
    dh_new, dc_ext = dh_new.contiguous(), _rows(dc_ext)
    dx = x.new_empty(B, I) if need[1] else None
    dh, dstate = x.new_empty(B, H), x.new_empty(B, H + 2 * Hh)
    grads = tuple(None if p is None else torch.empty_like(p) for p in params)
    st = _step_struct(cell, x, params, ws)
    fn = lib.hyper_step_bwd_f32 if x.dtype == torch.float32 else lib.hyper_step_bwd_f64
    fn(ctypes.byref(st), x.data_ptr(), h.data_ptr(), dh_new.data_ptr(), dc_ext.data_ptr(), dc_ext.stride(0),
       _kernels.ptr(dx), dh.data_ptr(), dstate.data_ptr(), *(_kernels.ptr(g) for g in grads))
    return dx, dh if need[2] else None, dstate, grads


class _HyperStep(torch.autograd.Function):
    """One HyperLSTMCell step: (x, h, c, h_hat, c_hat) -> (h', cat([c', h_hat', c_hat'], -1)).

    ``c`` is the main cell alone (with ``h_hat``, ``c_hat`` given, or both None: zeros) or the
    main cell with the hyper state appended (``h_hat``, ``c_hat`` None). The main LSTM's gates
    are kept gate-major, (4, B, H), so that d_h, d_x and b(z) of all gates come from one batched
    product with the (12, N_z, H) projections."""

    @staticmethod
    def forward(ctx, cell, x, h, c, hh, ch, *params):
        H, Hh, Nz = cell.hidden_size, cell.hyper_size, cell.embedding_size
        if hh is None and c.size(-1) == H + 2 * Hh:  # the packed pair state
            c_in, hh_in, ch_in = c[:, :H], c[:, H:H + Hh], c[:, H + Hh:]
        else:
            c_in, hh_in, ch_in = c, hh, ch
        ctx.cell, ctx.form = cell, ("packed" if c_in is not c else "full" if hh is not None else "short")
        ctx.kernels = _step_kernels(x)
        ctx.save_for_backward(x, h, c, hh, ch, *params)
        ctx.lib = _kernels.sequence_loops() if ctx.kernels is not None else None
        if ctx.lib is not None:
            return _step_forward_c(ctx, ctx.lib, cell, x, h, c_in, hh_in, ch_in, params)
        if ctx.kernels is not None:
            return _step_forward_kernels(ctx, ctx.kernels, cell, x, h, c_in, hh_in, ch_in, params)
        w_ih, w_hh, hw_ih, hw_hh, hb, zw, zb, dw, b0 = params
        B = x.size(0)
        # the hyper LSTM reads [h; x] (and its own h_hat): one product
        if hh_in is None:
            inp, w_inp = torch.cat([h, x], 1), hw_ih
        else:
            inp, w_inp = torch.cat([h, x, hh_in], 1), torch.cat([hw_ih, hw_hh], 1)
        hyper_pre = F.linear(inp, w_inp, hb)
        hacts, htc, ch_new, hh_new = _lstm_gates_forward(hyper_pre.view(B, 4, Hh), ch_in, 1)
        z = F.linear(hh_new, zw)                                    # (B, 12 Nz): z_h, z_x, z_b
        z[:, :8 * Nz] += zb
        z12 = z.view(B, 12, Nz).transpose(0, 1)
        d = torch.bmm(z12, dw.view(12, H, Nz).transpose(1, 2))      # (12, B, H): d_h, d_x, b(z)
        wh = F.linear(h, w_hh).view(B, 4, H).transpose(0, 1)        # W_h h, (4, B, H)
        wx = F.linear(x, w_ih).view(B, 4, H).transpose(0, 1)        # W_x x
        d_b = d[8:] if b0 is None else d[8:].add_(b0.view(4, 1, H))
        pre = torch.addcmul(d_b, d[:4], wh).addcmul_(d[4:8], wx)
        acts, tc, c_new, h_new = _lstm_gates_forward(pre, c_in, 0)
        ctx.inter = (inp, w_inp, wh, wx, hacts, htc, hh_new, z12, d, acts, tc)
        return h_new, torch.cat([c_new, hh_new, ch_new], 1)

    @staticmethod
    def backward(ctx, dh_new, dc_ext):
        x, h, c, hh, ch, *params = ctx.saved_tensors
        cell = ctx.cell
        if torch.is_grad_enabled():  # a graph of the gradient is wanted: recompute with eager ops
            return _HyperStep._eager_backward(ctx, (x, h, c, hh, ch), (dh_new, dc_ext))
        H, Hh, Nz = cell.hidden_size, cell.hyper_size, cell.embedding_size
        if ctx.lib is not None:
            dx, dh, dstate, param_grads = _step_backward_c(ctx, x, h, params, dh_new, dc_ext)
            if ctx.form == "packed":
                return (None, dx, dh, dstate, None, None, *param_grads)
            if ctx.form == "full":
                return (None, dx, dh, dstate[:, :H], dstate[:, H:H + Hh], dstate[:, H + Hh:], *param_grads)
            return (None, dx, dh, dstate[:, :H], None, None, *param_grads)
        if ctx.form == "packed":
            c, hh, ch = c[:, :H], c[:, H:H + Hh], c[:, H + Hh:]
        if ctx.kernels is not None:
            dx, dh, dc_prev, dhh_prev, dch_prev, param_grads = _step_backward_kernels(
                ctx, ctx.kernels, x, h, hh, params, dh_new, dc_ext)
            if ctx.form == "packed":
                return (None, dx, dh, torch.cat([dc_prev, dhh_prev, dch_prev], 1), None, None, *param_grads)
            if ctx.form == "full":
                return (None, dx, dh, dc_prev, dhh_prev, dch_prev, *param_grads)
            return (None, dx, dh, dc_prev, None, None, *param_grads)
        inp, w_inp, wh, wx, hacts, htc, hh_new, z12, d, acts, tc = ctx.inter
        w_ih, w_hh, _, hw_hh, _, zw, _, dw, b0 = params
        B, I = x.shape
        dc, dhh, dch = dc_ext.split([H, Hh, Hh], 1)
        dd = x.new_empty(12, B, H)                                  # d of d_h, d_x, b(z)
        dpre = dd[8:]
        dc_prev = _lstm_gates_backward(dh_new, dc, acts, tc, c, 0, dpre)
        torch.mul(dpre, wh, out=dd[:4])
        torch.mul(dpre, wx, out=dd[4:8])
        g_dw = torch.bmm(dd.transpose(1, 2), z12).view(3, 4, H, Nz)
        dz = torch.bmm(dd, dw.view(12, H, Nz)).transpose(0, 1).reshape(B, 12 * Nz)
        dhh = torch.addmm(dhh, dz, zw)
        dhpre = x.new_empty(B, 4, Hh)
        dch_prev = _lstm_gates_backward(dhh, dch, hacts, htc, ch, 1, dhpre)
        dhpre = dhpre.view(B, 4 * Hh)
        d_wh, d_wx = x.new_empty(B, 4, H), x.new_empty(B, 4, H)    # of W_h h, W_x x, batch-major
        torch.mul(dpre, d[:4], out=d_wh.transpose(0, 1))
        torch.mul(dpre, d[4:8], out=d_wx.transpose(0, 1))
        d_wh, d_wx = d_wh.view(B, 4 * H), d_wx.view(B, 4 * H)
        d_inp = dhpre.mm(w_inp)
        g_inp = dhpre.t().mm(inp)
        need = ctx.needs_input_grad
        dx = torch.addmm(d_inp[:, H:H + I], d_wx, w_ih) if need[1] else None
        dh = torch.addmm(d_inp[:, :H], d_wh, w_hh) if need[2] else None
        dhh_prev = None if hh is None else d_inp[:, H + I:]
        if ctx.form == "packed":
            grads_c = (torch.cat([dc_prev, dhh_prev, dch_prev], 1), None, None)
        elif ctx.form == "full":
            grads_c = (dc_prev, dhh_prev, dch_prev)
        else:
            grads_c = (dc_prev, None, None)
        param_grads = (d_wx.t().mm(x), d_wh.t().mm(h), g_inp[:, :H + I],
                       torch.zeros_like(hw_hh) if hh is None else g_inp[:, H + I:],
                       dhpre.sum(0), dz.t().mm(hh_new), dz[:, :8 * Nz].sum(0), g_dw,
                       None if b0 is None else dpre.sum(1).view(4 * H))
        return (None, dx, dh, *grads_c, *param_grads)

    @staticmethod
    def _eager_backward(ctx, inputs, grads):
        """The gradients as a differentiable graph (``create_graph=True``): the step recomputed
        with the eager ops from the saved inputs, then differentiated by autograd."""
        cell = ctx.cell
        H, Hh = cell.hidden_size, cell.hyper_size
        params = _step_params(cell)  # the leaves themselves (the saved ones are the same tensors)
        with torch.enable_grad():
            x, h, c, hh, ch = inputs
            if ctx.form == "packed":
                c, hh, ch = c.split([H, Hh, Hh], -1)
            elif ctx.form == "short":
                hh = ch = c.new_zeros(c.size(0), Hh)
            xw = torch.cat([F.linear(x, cell.weight_ih), F.linear(x, cell.hyper.weight_ih[:, H:], cell.hyper.bias)],
                           -1)
            h_new, (_, c_new, hh_new, ch_new) = cell.step(xw, (h, c, hh, ch))
            outs = (h_new, torch.cat([c_new, hh_new, ch_new], -1))
            every = (*inputs, *params)
            wrt = [t for t in every if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad(outs, wrt, grads, create_graph=True, allow_unused=True))
        out = [next(got) if t is not None and t.requires_grad else None for t in every]
        out = [torch.zeros_like(t) if g is None and t is not None and t.requires_grad else g
               for g, t in zip(out, every)]
        return (None, *out)


def _same_device(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_cpu:  # the common case, without comparing torch.device objects (several us each)
        return b.is_cpu
    return a.device == b.device


class HyperLSTMCell(nn.Module):
    """An LSTM cell whose weights are rescaled at every step by a small hyper LSTM.

    ``h, c = cell(input (B, I) or (I,), hx=None)``, as nn.LSTMCell: ``h`` is exactly the main
    LSTM's new h (what downstream layers read) and ``c = cat([c', h_hat', c_hat'], -1)`` of size
    ``hidden_size + 2 * hyper_size`` carries the main cell and the hyper LSTM's state, as the
    original TensorFlow cell concatenated its hyper state into its state. ``hx`` is None (zeros:
    a decoder's first step), nn.LSTMCell's pair ``(h, c)`` with ``c`` of size ``hidden_size``
    (the hyper state then starts at zero; e.g. the zeros a loop starts from) or the ``c`` this
    cell returned (continues exactly), or the 4-tuple ``(h, c, h_hat, c_hat)``, which gets the
    4-tuple back. So ``h, c = cell(x_t, (h, c))`` loops written for nn.LSTMCell run unchanged
    (float64 and closure optimisers such as LBFGS included). Differences from nn.LSTMCell:
    weights stacked in gate order i, g, f, o with the bias b_0 in ``scaling.bias`` (no
    ``bias_ih``/``bias_hh``); a dtype other than the parameters' raises a TypeError.

    ``hyper_size`` None (the default) is ``default_hyper_size(hidden_size)``: hidden_size // 4,
    at least 1 and at most the paper's 128, so never larger than the main cell. A single step
    (``forward``) without layer norm or active recurrent dropout runs as one autograd Function
    (``_HyperStep``; on CPU one call into the compiled library each way, its products in torch's
    MKL), for step loops; other settings run
    the per-step reference ops.

    Options:
    * ``layer_norm`` normalises every gate pre-activation and the cell (main and hyper LSTM);
    * ``recurrent_dropout`` drops the candidate g (no memory loss). ``hyper_recurrent_dropout``
      sets the hyper LSTM's rate; None (the default) uses ``recurrent_dropout`` there too. Chosen
      deliberately: the paper applies one recurrent keep probability to "the recurrent paths" and
      names a separate hyper rate only for its largest enwik8 model, so one rate is the plain
      reading of the paper; the original code instead defaults hyper recurrent dropout off ("not
      in the paper"), which is ``hyper_recurrent_dropout=0.0``;
    * ``z_input``: the z projections read the hyper LSTM's new state h_hat_t (``"current"``,
      the default, as the original TensorFlow code does and as every checkpoint of this package
      was trained) or h_hat_{t-1} (``"previous"``, the paper's equations as printed; the hyper
      LSTM then still steps on [h_{t-1}; x_t] and its output acts one step later);
    * ``layer_norm_eps`` (1e-5; the original code 1e-3) and ``layer_norm_bias`` (True; False gives
      the original's gain-only norms, the forget bias +1 then a constant after the gate norm),
      applied to the main and the hyper LSTM;
    * ``input_init`` for W_x: ``"orthogonal"`` per gate (the paper, default) or
      ``"xavier_uniform"`` (the original code: TensorFlow's default initialiser, for the main and
      the hyper LSTM's input weights).
    The fused fast path covers ``z_input="current"`` with gain-and-bias norms; other settings run
    the per-step reference path (same results, slower).
    """

    def __init__(self, input_size: int, hidden_size: int, hyper_size: int | None = None, embedding_size: int = 4,
                 bias: bool = True, layer_norm: bool = False, recurrent_dropout: float = 0.0,
                 hyper_recurrent_dropout: float | None = None, z_input: str = "current",
                 layer_norm_eps: float = 1e-5, layer_norm_bias: bool = True, input_init: str = "orthogonal"):
        super().__init__()
        self.input_size = check_positive("input_size", input_size)
        self.hidden_size = check_positive("hidden_size", hidden_size)
        hyper_size = default_hyper_size(hidden_size) if hyper_size is None else hyper_size
        self.hyper_size = check_positive("hyper_size", hyper_size)
        self.embedding_size = check_positive("embedding_size", embedding_size)
        self.recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout)
        hyper_rd = recurrent_dropout if hyper_recurrent_dropout is None else hyper_recurrent_dropout
        check_probability("hyper_recurrent_dropout", hyper_rd)
        self.layer_norm = bool(layer_norm)
        self.z_input = check_choice("z_input", z_input, Z_INPUTS)
        self.layer_norm_eps = check_eps(layer_norm_eps)
        self.layer_norm_bias = bool(layer_norm_bias)
        self.input_init = check_choice("input_init", input_init, ("orthogonal", "xavier_uniform"))
        self.bias = bool(bias)  # as nn.LSTMCell's flag; b_0 itself is scaling.bias
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size))  # W_x, gates i, g, f, o
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))           # W_h
        # The hyper LSTM reads [h_{t-1}; x_t]: columns [:H] of its weight_ih see h, [H:] see x.
        self.hyper = LSTMCell(H + input_size, hyper_size, bias=True, layer_norm=layer_norm,
                              recurrent_dropout=hyper_rd, layer_norm_eps=layer_norm_eps,
                              layer_norm_bias=layer_norm_bias,
                              input_init="xavier_uniform" if input_init == "xavier_uniform" else "uniform")
        self.scaling = WeightScaling(hyper_size, H, embedding_size, gates=4, bias=bias)
        self.gate_norm = GateLayerNorm(4, H, self.layer_norm_eps, self.layer_norm_bias) if layer_norm else None
        self.cell_norm = nn.LayerNorm(H, self.layer_norm_eps, bias=self.layer_norm_bias) if layer_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        H = self.hidden_size
        init_input_weight_(self.weight_ih, self.input_init, 4, H)  # the paper: orthogonal W_x and W_h
        orthogonal_per_gate_(self.weight_hh, 4)
        self.hyper.reset_parameters()
        self.scaling.reset_parameters()
        with torch.no_grad():
            if self.gate_norm is not None:  # forget bias +1 after the norm (see LSTMCell)
                reset_norms_(self.gate_norm, self.cell_norm)
                if self.gate_norm.bias is not None:
                    self.gate_norm.bias[2].fill_(1.0)
            elif self.scaling.bias is not None:
                self.scaling.bias[2 * H:3 * H].fill_(1.0)

    fused_supported = property(lambda self: self.z_input == "current" and self.hyper.fused_supported)

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
        z_source = h_hat  # h_hat_{t-1}, read only when z_input == "previous"
        hyper_pre = xw_hyper + F.linear(h, hyper.weight_ih[:, :H]) + F.linear(h_hat, hyper.weight_hh)
        h_hat, c_hat = lstm_update(hyper_pre, c_hat, hyper.gate_norm, hyper.cell_norm,
                                   hyper.recurrent_dropout, self.training)
        d_h, d_x, bias = self.scaling(h_hat if self.z_input == "current" else z_source)
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
        return _fused.hyper_lstm_sequence(self, x, state) if self.fused_supported else None

    def forward(self, input: torch.Tensor, hx=None):
        if not self._one_step_ok(input, hx):
            out = run_cell(self, input, hx)  # validates, and runs the eager ``step``
            return (out[0], torch.cat(out[1:], -1)) if hx is None else out
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        H = self.hidden_size
        if hx is None:
            h = c = x.new_zeros(x.size(0), H)
            hh = ch = None
        else:
            h, c, *rest = (s if batched else s.unsqueeze(0) for s in hx)
            hh, ch = rest if rest else (None, None)
        h_new, c_ext = _HyperStep.apply(self, x, h, c, hh, ch, *_step_params(self))
        if hx is None or len(hx) == 2:  # nn.LSTMCell's pair; c carries the hyper state
            out = (h_new, c_ext)
        else:  # the 4-tuple it was given
            out = (h_new, *c_ext.split([H, self.hyper_size, self.hyper_size], -1))
        return out if batched else tuple(t.squeeze(0) for t in out)

    def _one_step_ok(self, input, hx) -> bool:
        """Whether ``forward`` may run ``_HyperStep``: the configuration it covers (no layer norm,
        z from h_hat_t, no active recurrent dropout), well-formed arguments (anything else goes to
        ``run_cell``, which reports it), and no autocast, torch.func transform, forward-mode AD or
        compilation (those get the eager ops, which they handle natively)."""
        if (not self.fused or self.layer_norm or self.z_input != "current"
                or os.environ.get(_fused.ENV_VAR, "1") in ("0", "false", "False")
                or (self.training and (self.recurrent_dropout > 0.0 or self.hyper.recurrent_dropout > 0.0))):
            return False
        if not isinstance(input, torch.Tensor) or input.dim() not in (1, 2) or input.size(-1) != self.input_size:
            return False
        w = self.weight_hh
        if input.dtype != w.dtype or not _same_device(input, w) or torch.is_autocast_enabled(input.device.type):
            return False
        if (torch._C._functorch.peek_interpreter_stack() is not None or torch.compiler.is_compiling()
                or torch.autograd.forward_ad._current_level >= 0):
            return False
        if hx is None:
            return True
        if not isinstance(hx, (tuple, list)) or len(hx) not in (2, 4):
            return False
        lead = tuple(input.shape[:-1])
        H, Hh = self.hidden_size, self.hyper_size
        sizes = [(H,), (H, H + 2 * Hh)] if len(hx) == 2 else [(H,), (H,), (Hh,), (Hh,)]
        return all(isinstance(t, torch.Tensor) and t.dtype == w.dtype and _same_device(t, w)
                   and t.dim() == len(lead) + 1 and tuple(t.shape[:-1]) == lead and t.size(-1) in ok
                   for t, ok in zip(hx, sizes))


class HyperLSTM(RecurrentLayers):
    __doc__ = """Multi-layer HyperLSTM, a drop-in for ``torch.nn.LSTM``.

    ``output, state = m(input, hx=None)`` with input (T, B, I), (B, T, I) when ``batch_first``,
    unbatched (T, I), or a PackedSequence; ``output`` has nn.LSTM's shape (T, B, D * H).

    State format (the state comes back in the form ``hx`` went in):
    * ``hx=None`` or the 4-tuple: ``state = (h, c, h_hat, c_hat)`` where ``h`` and ``c`` are the
      main LSTM's (num_layers * D, B, hidden_size) tensors exactly as nn.LSTM returns them, and
      ``h_hat``, ``c_hat`` each layer's (and direction's) hyper LSTM state,
      (num_layers * D, B, hyper_size). Pass it back as ``hx`` to continue a sequence.
    * nn.LSTM's pair ``(h_0, c_0)``: the state comes back as a pair ``(h_n, c_ext)`` with ``h_n``
      exactly nn.LSTM's and ``c_ext = cat([c_n, h_hat_n, c_hat_n], -1)`` (size
      hidden_size + 2 * hyper_size), which continues exactly when passed back; a ``c_0`` of size
      hidden_size starts the hyper state at zero. Code that carries and detaches
      ``hidden`` (truncated BPTT) therefore runs unchanged.
    * ``pair_state=True`` returns that pair also when ``hx`` is None, for code that unpacks
      ``output, (h_n, c_n) = rnn(x)``.
    Unbatched input drops the B dimension.

    Cell options (``hyper_size``, ``embedding_size``, ``layer_norm``, ``recurrent_dropout``,
    ``hyper_recurrent_dropout``, ``z_input``, ``layer_norm_eps``, ``layer_norm_bias``,
    ``input_init``) are documented on ``HyperLSTMCell``. ``forward_with_activity`` also returns
    the per-step scaling vectors for analysis.
    """ + DROP_IN_NOTES

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, hyper_size: int | None = None, embedding_size: int = 4,
                 layer_norm: bool = False,
                 recurrent_dropout: float = 0.0, hyper_recurrent_dropout: float | None = None,
                 z_input: str = "current", layer_norm_eps: float = 1e-5, layer_norm_bias: bool = True,
                 input_init: str = "orthogonal", pair_state: bool = False):
        check_positive("input_size", input_size)
        check_positive("hidden_size", hidden_size)
        check_positive("num_layers", num_layers)
        check_projection(proj_size)
        cells, reverse = stack_cells(
            lambda n_in: HyperLSTMCell(n_in, hidden_size, hyper_size=hyper_size, embedding_size=embedding_size,
                                       bias=bias, layer_norm=layer_norm, recurrent_dropout=recurrent_dropout,
                                       hyper_recurrent_dropout=hyper_recurrent_dropout, z_input=z_input,
                                       layer_norm_eps=layer_norm_eps, layer_norm_bias=layer_norm_bias,
                                       input_init=input_init),
            input_size, hidden_size, num_layers, bidirectional)
        super().__init__(cells, batch_first=batch_first, dropout=dropout, reverse_cells=reverse)
        self.bias = bool(bias)
        self.mode = "LSTM"  # nn.LSTM's attribute (code branches on it to build (h_0, c_0))
        self.pair_state = bool(pair_state)
        self.hyper_size = cells[0].hyper_size  # the default resolved (default_hyper_size)
        self.embedding_size = embedding_size
        self.layer_norm = bool(layer_norm)
        self.recurrent_dropout = float(recurrent_dropout)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)


class HyperRNNCell(nn.Module):
    """The basic HyperRNN: a tanh RNN whose weights are rescaled by a small tanh hyper RNN.

        h_hat_t = tanh(W_hat [h_{t-1}; x_t] + U_hat h_hat_{t-1} + b_hat)
        h_t     = tanh(d_h(z) * (W_h h_{t-1}) + d_x(z) * (W_x x_t) + b(z))

    ``forward(input, hx=None) -> (h, h_hat)``; given one tensor ``hx`` (nn.RNNCell's h, or h with
    h_hat appended), it returns one tensor ``cat([h, h_hat], -1)``.
    """

    tensor_state = True  # the state may travel as one tensor, like nn.RNN's

    def __init__(self, input_size: int, hidden_size: int, hyper_size: int | None = None, embedding_size: int = 4,
                 bias: bool = True):
        super().__init__()
        self.input_size = check_positive("input_size", input_size)
        self.hidden_size = check_positive("hidden_size", hidden_size)
        hyper_size = default_hyper_size(hidden_size) if hyper_size is None else hyper_size
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
    """Multi-layer HyperRNN with nn.RNN's constructor and forward contract.

    ``output, state = m(input, hx=None)``; ``state`` is ``(h, h_hat)`` of shapes
    (num_layers * D, B, hidden_size) and (num_layers * D, B, hyper_size). Given nn.RNN's tensor
    ``hx`` (h_0 of hidden_size, the hyper state then starting at zero, or h with h_hat appended),
    the state comes back as one tensor ``cat([h_n, h_hat_n], -1)``: ``[..., :hidden_size]`` is
    nn.RNN's h_n, and the whole tensor continues the sequence exactly when passed back.
    ``nonlinearity`` must be ``"tanh"`` (the paper's HyperRNN); ``bidirectional`` as nn.RNN.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, hyper_size: int | None = None, embedding_size: int = 4):
        check_positive("input_size", input_size)
        check_positive("hidden_size", hidden_size)
        check_positive("num_layers", num_layers)
        if nonlinearity != "tanh":
            raise ValueError(f"nonlinearity must be 'tanh' (the paper's HyperRNN), got {nonlinearity!r}")
        cells, reverse = stack_cells(
            lambda n_in: HyperRNNCell(n_in, hidden_size, hyper_size=hyper_size, embedding_size=embedding_size,
                                      bias=bias),
            input_size, hidden_size, num_layers, bidirectional)
        super().__init__(cells, batch_first=batch_first, dropout=dropout, reverse_cells=reverse)
        self.nonlinearity = nonlinearity
        self.mode = "RNN_TANH"
        self.bias = bool(bias)
        self.hyper_size = cells[0].hyper_size  # the default resolved (default_hyper_size)
        self.embedding_size = embedding_size
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)


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
                    hyper_recurrent_dropout: float | None = None, z_input: str = "current",
                    layer_norm_eps: float = 1e-5, layer_norm_bias: bool = True,
                    input_init: str | None = None) -> RecurrentLayers:
    """The recurrent stack for an experiment's ``cell`` option: one of ``CELL_KINDS``.

    The hyper-only options (``hyper_size``, ``embedding_size``, ``hyper_recurrent_dropout``,
    ``z_input``) are ignored by the LSTM cells; ``input_init`` None keeps each cell's default
    (HyperLSTM: orthogonal, the paper; LSTM: torch's uniform). See ``HyperLSTMCell``."""
    if cell not in CELL_KINDS:
        raise ValueError(f"cell must be one of {', '.join(CELL_KINDS)}; got {cell!r}")
    layer_norm = cell.startswith("ln-")
    common = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, dropout=dropout,
                  layer_norm=layer_norm, recurrent_dropout=recurrent_dropout, layer_norm_eps=layer_norm_eps,
                  layer_norm_bias=layer_norm_bias)
    if input_init is not None:
        common["input_init"] = input_init
    if cell.endswith("hyperlstm"):
        return HyperLSTM(input_size, hidden_size, hyper_size=hyper_size, embedding_size=embedding_size,
                         hyper_recurrent_dropout=hyper_recurrent_dropout, z_input=z_input, **common)
    return LSTM(input_size, hidden_size, **common)

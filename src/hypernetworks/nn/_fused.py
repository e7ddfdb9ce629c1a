"""Fused whole-sequence forward and backward for the LSTM and HyperLSTM layers.

Autograd over a per-step loop records ~30 small ops per step and, in backward, computes every
weight gradient as one thin matrix product per step. The ``torch.autograd.Function``s here run
the time loop themselves, save only what backward needs (gate activations, cells, the hyper
embeddings z, the hidden-side products), and do backpropagation through time by hand:

* forward, per step: ONE matrix product ``h_{t-1} @ [W_h; W_hat_h]^T`` serves both the main
  LSTM and the hyper LSTM's h-columns; the scaling vectors d come from z by a batched product
  with the (3, 4, H, N_z) projection, so no per-step weight matrix is ever formed;
* backward, per step: one matrix product for dh_{t-1} with the same concatenated weight; the
  per-step gradients of the hidden-side pre-activations are written into a (T, B, .) buffer
  and every weight gradient is then ONE matrix product over all T * B rows (as cuDNN does).

On CPU in float32 the per-step products go through oneDNN (``mkldnn::_linear_pointwise``),
which on this class of machine is ~2x faster than the BLAS ``mm`` at batch-sized M, and is
what ``torch.nn.LSTM``'s own CPU kernel uses; elsewhere (float64, CUDA) they use ``torch.mm``.
Under torch.autocast the products run in the low precision and everything else in float32
(see "mixed precision" below; bf16 products on CPU go through oneDNN too where the CPU has native
bf16). torch.compile sees each layer's run as one opaque call (``_sequence._compiler_opaque``).

The per-step elementwise work (nonlinearities, d-scaling, layer norms, cell update, dropout
masks) runs on CPU in the compiled kernels of ``hypernetworks/nn/_kernels`` (three calls per step
each way); on CPU in float32/float64 without mixed precision the time loop itself runs there too
(``_seq_loops``: the per-step products in the MKL that torch links, no Python per step), else a
Python loop calls the kernels; on CUDA in float32 the kernels' Triton counterparts run (``_triton_kernels``, when triton
imports; ``HYPERNETWORKS_TRITON=0`` switches them off); elsewhere (no compiler: one warning; no
triton; CUDA in other dtypes) the same Functions do it with PyTorch ops. PackedSequence batches run
with per-step active batch sizes (``packed_forward``; the PyTorch-op path runs all rows and makes
the finished ones inert); single steps with autograd off run here too, with cached prepared weights.

The plain LSTM without layer norm or recurrent dropout simply calls torch's fused LSTM kernel
(``torch._VF.lstm``, i.e. oneDNN on CPU and cuDNN on GPU) with the gates permuted from this
package's i, g, f, o order to torch's i, f, g, o.

Numerics, parameter layout and the random stream of recurrent dropout are those of the eager
``step`` path (masks are drawn per step in the same order, hyper LSTM first), so the two paths
agree to rounding. Switch the fused path off with the environment variable
``HYPERNETWORKS_FUSED=0`` or per cell with ``cell.fused = False`` (e.g. to debug against the
reference ``step``); ``HYPERNETWORKS_KERNELS=0`` keeps it but without the compiled kernels.
Activity recording always uses ``step``.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from hypernetworks.nn import _kernels

ENV_VAR = "HYPERNETWORKS_FUSED"
_GATE_PERM = (0, 2, 1, 3)  # i, g, f, o -> torch's i, f, g, o


def fused_enabled(cell, x: torch.Tensor) -> bool:
    """Whether to take the fused path. Single steps with autograd on stay on the eager ``step``;
    without autograd (sampling, beam search, serving) they take the fused path too, whose prepared
    weights are then cached on the cell (``_prepared``), so a step has no per-call weight set-up."""
    return (bool(getattr(cell, "fused", True)) and os.environ.get(ENV_VAR, "1") not in ("0", "false", "False")
            and (x.size(0) > 1 or not torch.is_grad_enabled())
            and (x.dtype in (torch.float32, torch.float64) or _amp_dtype(cell, x) == x.dtype)
            # a cell's non-default switches (z from h_hat_{t-1}, gain-only norms) are eager-only
            and bool(getattr(cell, "fused_supported", True)))


# -- matrix products --------------------------------------------------------------------------
def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _has_onednn_linear()
_REORDER = _ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _has_onednn_bf16() -> bool:
    try:
        return _ONEDNN and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# oneDNN's dtypes for the per-step products on CPU: float32, and bf16 (mixed precision) where the CPU
# has native bf16 (AVX512-BF16 / AMX), where the reordered bf16 product takes ~0.6x the time of torch.mm.
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if _has_onednn_bf16() else (torch.float32,)


def _step_weight(w: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """``w`` (N, K) for T per-step products ``_linear(a, w)`` with a (<= B, K): on CPU in float32
    (or bf16 under mixed precision), reordered once into oneDNN's blocked layout, which each product
    otherwise does itself (~10% of a step's product at the PTB size in float32; the reorder costs about
    half of one product, so it only pays off over several steps). The result is only for ``_linear``."""
    if (T >= 4 and _REORDER and w.device.type == "cpu" and w.dtype in _ONEDNN_DTYPES
            and not torch.is_grad_enabled()):
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), B)
    return w.contiguous()


def _linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` for a (M, K), w (N, K) (or ``_step_weight(w)``); ``w`` in a lower precision
    (mixed precision, see ``_mm``): the product runs in ``w``'s dtype, the result comes back in ``a``'s."""
    if w.dtype != a.dtype:
        return _linear(a.to(w.dtype), w).to(a.dtype)
    if _ONEDNN and a.device.type == "cpu" and a.dtype in _ONEDNN_DTYPES:
        return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
    return torch.mm(a, w.t())


# -- mixed precision ---------------------------------------------------------------------------
# Under torch.autocast (bf16 or fp16; Lightning's "bf16-mixed" / "16-mixed") the fused paths run
# the matrix products in autocast's dtype and everything else in float32: the weight matrices enter
# the Functions cast to the low precision (a differentiable cast outside, so their gradients reach
# the float32 parameters), the activations, states, layer norms, gate nonlinearities, reductions
# and the step kernels stay float32. Each product casts its activation operand down and its result
# back up (``_mm``, ``_addmm``, ``_linear``); the weight gradients are one low-precision product
# over all T * B rows each (``_gemm``), as autocast's own backward of a linear layer. Inside the
# Functions autocast is off, so nothing is cast twice and ``out=`` products keep their dtype.
def _amp_dtype(cell, x: torch.Tensor) -> "torch.dtype | None":
    """Autocast's low-precision dtype when autocast is on for x's device and the cell's weights
    are float32 (what autocast lowers), else None."""
    dev = x.device.type
    try:
        if not torch.is_autocast_enabled(dev):
            return None
        low = torch.get_autocast_dtype(dev)
    except (TypeError, RuntimeError, AttributeError):  # a device type autocast does not know
        return None
    if cell.weight_hh.dtype != torch.float32 or low == torch.float32:
        return None
    return low


def _no_autocast(device_type: str):
    """Autocast off for ``device_type`` inside the fused Functions (a no-op context when it is off)."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):
        on = False
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (into ``out``); with ``b`` in a lower precision than ``a`` the product runs in
    ``b``'s dtype and the result comes back in ``a``'s."""
    if a.dtype == b.dtype:
        return torch.mm(a, b, out=out)
    r = torch.mm(a.to(b.dtype), b)
    return r.to(a.dtype) if out is None else out.copy_(r)


def _addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``c + a @ b`` (into ``out``), the product as in ``_mm``; the sum in ``c``'s dtype."""
    if a.dtype == b.dtype:
        return torch.addmm(c, a, b, out=out)
    r = torch.mm(a.to(b.dtype), b)
    return torch.add(c, r) if out is None else torch.add(c, r, out=out)


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place, the product as in ``_mm``."""
    if a.dtype == b.dtype:
        return acc.addmm_(a, b)
    return acc.add_(torch.mm(a.to(b.dtype), b))


def _gemm(a: torch.Tensor, b: torch.Tensor, low: "torch.dtype | None") -> torch.Tensor:
    """A weight gradient ``a @ b`` over all T * B rows: in ``low`` when given (mixed precision)."""
    if low is None:
        return torch.mm(a, b)
    return torch.mm(a.to(low), b.to(low))


def _recurrent_weight_grad(d: torch.Tensor, h0: torch.Tensor, out: torch.Tensor, low) -> torch.Tensor:
    """The gradient of a recurrent weight, sum over t of ``d[t]^T h_{t-1}`` (N, H) for d (T, B, N) and
    h_{t-1} = h0, then out[:-1]. Computed as the transpose of ``h_prev^T d``: d was just written by the
    backward loop and is mostly out of cache, and MKL streams it faster in this orientation than as
    ``d^T h_prev`` (a third less time at the demo's size). Without mixed precision, two products
    instead of a (T, B, H) copy of h_prev."""
    T, B, N = d.shape
    H = h0.size(-1)
    if low is not None:  # one low-precision product over all T * B rows
        h_prev = torch.cat([h0.unsqueeze(0), out[:-1]]).view(T * B, H)
        return _gemm(h_prev.t(), d.reshape(T * B, N), low).t()
    g = torch.mm(h0.t(), d[0])
    if T > 1:
        g.addmm_(out[:-1].reshape((T - 1) * B, H).t(), d[1:].reshape((T - 1) * B, N))
    return g.t()


# -- one LSTM state update, forward and backward ----------------------------------------------
class _Saved:
    """Per-sequence buffers for one LSTM (main or hyper) in the fused loop."""

    def __init__(self, T: int, B: int, S: int, like: torch.Tensor, layer_norm: bool,
                 ws: "_Workspace | None" = None, tag: str = ""):
        ws = ws or _Workspace(None, like)
        alloc = lambda name, *shape: ws.alloc(tag + name, shape)  # noqa: E731
        self.act = alloc("act", T, B, 4 * S)         # sigmoid(i), tanh(g), sigmoid(f), sigmoid(o)
        self.c = alloc("c", T + 1, B, S)             # c_0 .. c_T
        self.ln = layer_norm
        if layer_norm:
            self.gx = alloc("gx", T, B, 4, S)        # normalised gate pre-activations
            self.grstd = alloc("grstd", T, B, 4, 1)
            self.cmean = alloc("cmean", T, B, 1)
            self.crstd = alloc("crstd", T, B, 1)
            self.tc = alloc("tc", T, B, S)           # tanh(LN(c))

    def tensors(self) -> list[torch.Tensor]:
        out = [self.act, self.c]
        if self.ln:
            out += [self.gx, self.grstd, self.cmean, self.crstd, self.tc]
        return out

    @classmethod
    def from_tensors(cls, items: list[torch.Tensor], layer_norm: bool) -> "_Saved":
        self = cls.__new__(cls)
        self.ln = layer_norm
        self.act, self.c = items[0], items[1]
        if layer_norm:
            self.gx, self.grstd, self.cmean, self.crstd, self.tc = items[2:7]
        return self


def _update_forward(t: int, pre: torch.Tensor, sv: _Saved, norms, mask, eps: float,
                    h_out: torch.Tensor | None = None) -> torch.Tensor:
    """The LSTM update of ``lstm.lstm_update`` at step t; writes c_{t+1} and what backward needs."""
    B, S = pre.size(0), sv.c.size(-1)
    gw, gb, cw, cb = norms
    if sv.ln:
        gx, _, rstd = torch.native_layer_norm(pre.view(B, 4, S), (S,), None, None, eps)
        sv.gx[t].copy_(gx)
        sv.grstd[t].copy_(rstd)
        pre = torch.addcmul(gb, gx, gw).view(B, 4 * S)
    act = sv.act[t]
    torch.sigmoid(pre, out=act)
    g = act[:, S:2 * S]
    torch.tanh(pre[:, S:2 * S], out=g)
    i, f, o = act[:, :S], act[:, 2 * S:3 * S], act[:, 3 * S:]
    if mask is not None:
        g = g * mask
    c = torch.addcmul(f * sv.c[t], i, g, out=sv.c[t + 1])
    if sv.ln:
        cn, cmean, crstd = torch.native_layer_norm(c, (S,), cw, cb, eps)
        sv.cmean[t].copy_(cmean)
        sv.crstd[t].copy_(crstd)
        tc = torch.tanh(cn, out=sv.tc[t])
    else:
        tc = torch.tanh(c)
    return torch.mul(o, tc, out=h_out) if h_out is not None else o * tc


def _update_backward(t: int, dh: torch.Tensor, dc: torch.Tensor, sv: _Saved, norms, mask, eps: float,
                     grads: dict, dpre_out: torch.Tensor) -> torch.Tensor:
    """Backward of ``_update_forward`` at step t. Writes d(pre) into ``dpre_out`` (B, 4S) and
    returns dc_{t-1}; layer-norm parameter gradients accumulate into ``grads``."""
    S = sv.c.size(-1)
    act = sv.act[t]
    i, g, f, o = act[:, :S], act[:, S:2 * S], act[:, 2 * S:3 * S], act[:, 3 * S:]
    c = sv.c[t + 1]
    tc = sv.tc[t] if sv.ln else torch.tanh(c)
    gw, gb, cw, cb = norms
    dact = dpre_out  # first the gradient w.r.t. the activated gates, then through the nonlinearities
    torch.mul(dh, tc, out=dact[:, 3 * S:])
    dtc = torch.ops.aten.tanh_backward(dh * o, tc)
    if sv.ln:
        dcn, dcw, dcb = torch.ops.aten.native_layer_norm_backward(
            dtc, c, (S,), sv.cmean[t], sv.crstd[t], cw, cb, [True, True, True])
        grads["cw"] += dcw
        grads["cb"] += dcb
        dc = dc + dcn
    else:
        dc = dc + dtc
    torch.mul(dc, g * mask if mask is not None else g, out=dact[:, :S])
    torch.mul(dc, sv.c[t], out=dact[:, 2 * S:3 * S])
    dg = torch.mul(dc, i, out=dact[:, S:2 * S])
    if mask is not None:
        dg.mul_(mask)
    dg_pre = torch.ops.aten.tanh_backward(dg, g)
    torch.ops.aten.sigmoid_backward(dact, act, grad_input=dact)  # elementwise, in place
    dact[:, S:2 * S] = dg_pre
    dc_prev = dc * f
    if sv.ln:
        B = dh.size(0)
        dy = dact.view(B, 4, S)
        gx = sv.gx[t]
        grads["gw"] += (dy * gx).sum(0)
        grads["gb"] += dy.sum(0)
        dxh = dy * gw
        dx = (dxh - dxh.mean(-1, keepdim=True) - gx * (dxh * gx).mean(-1, keepdim=True)) * sv.grstd[t]
        dact.copy_(dx.view(B, 4 * S))
    return dc_prev


def _norm_params(cell):
    if cell.gate_norm is None:
        return (None, None, None, None)
    return (cell.gate_norm.weight, cell.gate_norm.bias, cell.cell_norm.weight, cell.cell_norm.bias)


def _eps(cell) -> float:
    return float(cell.gate_norm.eps) if cell.gate_norm is not None else 1e-5


def _ln_grads(norms, like_S) -> dict:
    if norms[0] is None:
        return {}
    gw, _, cw, _ = norms
    return {"gw": torch.zeros_like(gw), "gb": torch.zeros_like(gw),
            "cw": torch.zeros_like(cw), "cb": torch.zeros_like(cw)}


def _dropout_masks(cells_rates, T: int, B: int, like: torch.Tensor):
    """Recurrent-dropout masks, drawn per step in the eager path's order (same random stream)."""
    active = [(S, p) for S, p in cells_rates]
    if all(p is None for _, p in active):
        return [None] * len(active)
    out = [like.new_empty(T, B, S) if p is not None else None for S, p in active]
    ones = [like.new_ones(B, S) if p is not None else None for S, p in active]
    for t in range(T):
        for k, (S, p) in enumerate(active):
            if p is not None:
                out[k][t] = F.dropout(ones[k], p, training=True)
    return out


# Outside the modules, so that deepcopy, pickling and state_dict never carry the cached tensors.
_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cast(w: torch.Tensor, low) -> torch.Tensor:
    return w if low is None else w.to(low)


def _low_weight(module, name: str, low) -> torch.Tensor:
    """``module.<name>``, or under mixed precision its low-precision copy (cached like ``_prepared``)."""
    w = getattr(module, name)
    return w if low is None else _prepared(module, f"{name}.{low}", (w,), lambda: w.to(low))


# -- reusable work buffers ----------------------------------------------------------------------
# The fused loops' intermediates (gate activations, cells, layer-norm statistics, the hyper LSTM's
# states, d(a)) are hundreds of MB at the paper's size. Fresh buffers of that size come from mmap
# every call, and the kernel then zeroes every page at its first touch: ~0.1 to 0.3 s of system time
# per forward + backward at the PTB size. On CPU they are therefore kept per cell and reused once
# nothing refers to them any more: the pool hands out views, so a buffer is free exactly when the
# only references to its storage are the pool's own tensor and the check's (saved tensors, views
# and results keep it busy; backward releases the saved ones). Busy buffers mean a fresh one.
_WORKSPACES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_WORKSPACE_LOCK = threading.Lock()
_WORKSPACE_SLOTS = 2  # per tag: e.g. two graphs alive at once (gradient accumulation); more go unpooled
_CAN_POOL = hasattr(torch._C, "_storage_Use_Count")


def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _Workspace:
    """Buffers of one cell's fused calls (``alloc``), or plain fresh tensors when ``owner`` is None,
    off CPU, or when this torch has no storage use count."""

    def __init__(self, owner, like: torch.Tensor):
        self.like = like
        self.pool = None
        if owner is not None and _CAN_POOL and like.device.type == "cpu" and os.environ.get(
                "HYPERNETWORKS_WORKSPACE", "1") != "0":
            with _WORKSPACE_LOCK:
                self.pool = _WORKSPACES.setdefault(owner, {})

    def alloc(self, tag: str, shape, zero: bool = False) -> torch.Tensor:
        like, shape = self.like, tuple(shape)
        if self.pool is None:
            return like.new_zeros(shape) if zero else like.new_empty(shape)
        n = 1
        for k in shape:
            n *= k
        with _WORKSPACE_LOCK:
            slots = self.pool.setdefault(tag, [])
            out = None
            for i, base in enumerate(slots):
                if _storage_refs(base) != 2:  # busy
                    continue
                if base.dtype != like.dtype or base.numel() < n:
                    slots[i] = base = like.new_empty(max(n, base.numel() if base.dtype == like.dtype else 0))
                out = base[:n].view(shape)
                break
            if out is None:
                if len(slots) >= _WORKSPACE_SLOTS:
                    return like.new_zeros(shape) if zero else like.new_empty(shape)
                base = like.new_empty(n)
                slots.append(base)
                out = base[:n].view(shape)
        return out.zero_() if zero else out


def _prepared(cell, name: str, params, build):
    """``build()`` (weights derived from ``params``: concatenated, permuted), cached on the cell
    while autograd is off and the parameters are unchanged (same storage, same in-place version
    counter, which optimizer steps and ``load_state_dict`` bump), so that one-step calls in a
    sampling loop do not rebuild them. With autograd on it is built per call, inside the graph.
    In-place writes through ``p.data`` bump no counter and are not seen (docs/rnn_speed.md says so)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return build()
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    cache = _PREPARED.setdefault(cell, {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, build())
    return hit[1]


# -- the compiled step kernels (hypernetworks/nn/_kernels) ------------------------------------
# Tests only: take the Triton kernels for CPU float32 tensors too (with TRITON_INTERPRET=1 set
# before hypernetworks.nn._triton_kernels is imported, Triton runs them in its interpreter).
_TRITON_ON_CPU = False


def _triton_kernels():
    """The Triton step kernels' class (``_triton_kernels.TritonKernels``), or None when triton does
    not import or ``HYPERNETWORKS_TRITON=0``. Imported on first use: CPU-only runs never import triton."""
    from hypernetworks.nn import _triton_kernels as tk
    return tk.TritonKernels if tk.available() else None


def _kernels_for(like: torch.Tensor):
    """The step kernels for tensors like ``like``: on CUDA in float32 the Triton kernels (when triton
    imports), on CPU the compiled C++ kernels; None (other dtypes, no triton, no compiler): the
    callers then run the same step with PyTorch ops. Hand the result to ``_step_kernels``."""
    dev = like.device.type
    if like.dtype == torch.float32 and (dev == "cuda" or (_TRITON_ON_CPU and dev == "cpu")):
        tk = _triton_kernels()
        if tk is not None or dev == "cuda":
            return tk
    if dev != "cpu" or like.dtype not in (torch.float32, torch.float64):
        return None
    return _kernels.library()


_p = _kernels.ptr  # a tensor's data pointer for ctypes, None for None


class _Kernels:
    """Typed views of the kernels for one dtype; strides are read from the tensors (the last
    dimension must be contiguous, which every caller here guarantees)."""

    def __init__(self, lib, like: torch.Tensor):
        sfx = "f32" if like.dtype == torch.float32 else "f64"
        self._fwd = getattr(lib, f"cell_fwd_{sfx}")
        self._bwd = getattr(lib, f"cell_bwd_{sfx}")
        self._hfwd = getattr(lib, f"hyper_pre_fwd_{sfx}")
        self._hbwd = getattr(lib, f"hyper_pre_bwd_{sfx}")

    def hyper_fwd(self, B, H, Nz, a, xw, z, wd, bias, pre):
        """HyperLSTM pre-activations of the first B rows (see hyper_pre_fwd in lstm_kernels.cpp)."""
        self._hfwd(B, H, Nz, _p(a), a.stride(0), _p(xw), _p(z), _p(wd), _p(bias), _p(pre))

    def hyper_bwd(self, B, H, Nz, dpre, a, xw, z, wd, d_a, d_xw, dz, g_wd, g_bias):
        """Backward of ``hyper_fwd`` (hyper_pre_bwd in lstm_kernels.cpp)."""
        self._hbwd(B, H, Nz, _p(dpre), _p(a), a.stride(0), _p(xw), _p(z), _p(wd), _p(d_a), d_a.stride(0),
                   _p(d_xw), _p(dz), _p(g_wd), _p(g_bias))

    def cell_fwd(self, t, B, pre, add1, add2, sv: _Saved, norms, eps, mask, h_out):
        """Step t on the first B rows (the active ones of a packed batch)."""
        S = sv.c.size(-1)
        gw, gb, cw, cb = norms
        ln = sv.ln
        self._fwd(B, S, _p(pre), pre.stride(0), _p(add1), 0 if add1 is None else add1.stride(0),
                  _p(add2), 0 if add2 is None else add2.stride(0), _p(gw), _p(gb), _p(cw), _p(cb), eps,
                  None if mask is None else _p(mask[t]), _p(sv.c[t]), _p(sv.act[t]), _p(sv.c[t + 1]),
                  _p(h_out), h_out.stride(0), _p(sv.gx[t]) if ln else None, _p(sv.grstd[t]) if ln else None,
                  _p(sv.cmean[t]) if ln else None, _p(sv.crstd[t]) if ln else None, _p(sv.tc[t]) if ln else None)

    def cell_bwd(self, t, B, dh, dh_add, dc, sv: _Saved, norms, mask, dpre_out, grads):
        """Step t on the first B rows; dc is updated in place to dc_{t-1}; d(pre) goes into dpre_out."""
        S = sv.c.size(-1)
        gw, _, cw, _ = norms
        ln = sv.ln
        self._bwd(B, S, _p(dh), _p(dh_add), _p(dc), _p(sv.act[t]), _p(sv.c[t]), _p(sv.c[t + 1]),
                  _p(sv.tc[t]) if ln else None, None if mask is None else _p(mask[t]), _p(gw), _p(cw),
                  _p(sv.gx[t]) if ln else None, _p(sv.grstd[t]) if ln else None,
                  _p(sv.cmean[t]) if ln else None, _p(sv.crstd[t]) if ln else None,
                  _p(dpre_out), dpre_out.stride(0), _p(dc),
                  _p(grads.get("gw")), _p(grads.get("gb")), _p(grads.get("cw")), _p(grads.get("cb")))


def _step_kernels(lib, like: torch.Tensor):
    """The per-step kernel object for ``lib`` from ``_kernels_for``: ``_Kernels`` over the compiled
    library, or a ``TritonKernels`` (same methods, on tensors)."""
    return _Kernels(lib, like) if isinstance(lib, ctypes.CDLL) else lib(like)


def _last_steps(batch_sizes, T: int, B: int, device) -> torch.Tensor:
    """Index of each row's last step: T - 1, or per row of a packed batch (sorted by length)."""
    if batch_sizes is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=device)
    sizes = torch.tensor(batch_sizes, device=device)
    return (sizes.unsqueeze(1) > torch.arange(B, device=device)).sum(0) - 1


def ar(B: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(B, device=like.device)


def _contiguous(ts):
    return tuple(None if t is None else t.contiguous() for t in ts)


# -- whole-sequence loops in the compiled library (_kernels.sequence_loops) ----------------------
# The same steps as the Python loops below (_hyper_forward_kernels, ...), the time loop itself in
# C++ with the per-step products in torch's BLAS: at small sizes the Python loop costs more than the
# arithmetic of a step.
def _seq_loops(lib, like: torch.Tensor, low) -> "ctypes.CDLL | None":
    """The library's sequence loops when they can run here: CPU kernels (not Triton), no mixed
    precision (its products stay in torch), and torch's BLAS found."""
    if low is not None or not isinstance(lib, ctypes.CDLL):
        return None
    return _kernels.sequence_loops()


def _lstm_struct(sv: _Saved, norms, eps: float, mask, grads=None) -> "_kernels.Lstm":
    gw, gb, cw, cb = norms
    g = grads or {}
    stats = (sv.gx, sv.grstd, sv.cmean, sv.crstd, sv.tc) if sv.ln else (None,) * 5
    return _kernels.Lstm(sv.c.size(-1), float(eps), _p(gw), _p(gb), _p(cw), _p(cb), _p(mask), _p(sv.act),
                         _p(sv.c), *(_p(t) for t in stats), _p(g.get("gw")), _p(g.get("gb")), _p(g.get("cw")),
                         _p(g.get("cb")))


def _sizes_tensor(batch_sizes):
    return None if batch_sizes is None else torch.as_tensor(list(batch_sizes), dtype=torch.int64)


def _loop_fn(lib, name: str, like: torch.Tensor):
    return getattr(lib, f"{name}_{'f32' if like.dtype == torch.float32 else 'f64'}")


def _hyper_forward_loops(lib, xw, xw_hat, h0, w_cat, w_hat_hh, z_weight, z_bias, d_weight, bias, norms, hnorms,
                         mask, hmask, eps, hyper_eps, main, hyp, out, hh_all, z_all, batch_sizes, ws):
    """The forward loop of _HyperLSTMFunction in one call; returns the per-step products
    a_t = h_{t-1} @ [W_h; W_hat_h]^T, (T, B, 4H + 4Hh), kept for backward."""
    T, B = xw.shape[:2]
    H, Hh, Nz = h0.size(-1), hh_all.size(-1), d_weight.size(-1)
    norms, hnorms = _contiguous(norms), _contiguous(hnorms)
    mask, hmask = _contiguous((mask, hmask))
    w_cat, w_hat_hh, z_weight = _contiguous((w_cat, w_hat_hh, z_weight))
    zb = torch.cat([z_bias, z_bias.new_zeros(4 * Nz)])            # z_b has no bias
    wd = d_weight.transpose(-1, -2).contiguous()                  # (3, 4, Nz, H): units innermost
    bias = xw.new_zeros(4 * H) if bias is None else bias.contiguous()
    a_all = ws.alloc("a_all", (T, B, 4 * H + 4 * Hh))
    pre, hpre = xw.new_empty(B, 4 * H), xw.new_empty(B, 4 * Hh)
    sizes = _sizes_tensor(batch_sizes)
    p = _kernels.HyperSeq(T=T, B=B, H=H, Hh=Hh, Nz=Nz, batch_sizes=_p(sizes), xw=_p(xw), xw_hat=_p(xw_hat),
                          h0=_p(h0), w_cat=_p(w_cat), w_hat_hh=_p(w_hat_hh), z_weight=_p(z_weight), zb=_p(zb),
                          wd=_p(wd), bias=_p(bias), out=_p(out), hh_all=_p(hh_all), z_all=_p(z_all),
                          a_all=_p(a_all), pre=_p(pre), hpre=_p(hpre),
                          main=_lstm_struct(main, norms, eps, mask), hyp=_lstm_struct(hyp, hnorms, hyper_eps, hmask))
    _loop_fn(lib, "hyper_seq_fwd", xw)(ctypes.byref(p))
    return a_all


class _HyperGrads:
    """The buffers of a HyperLSTM backward loop (either loop): gradients returned to autograd, work
    buffers from the pool, and the final states' incoming gradients as buffers updated in place."""

    def __init__(self, xw, h0, hh_all, z_all, d_weight, has_bias, batch_sizes, ws, d_cT, d_hhT, d_chT):
        T, B = xw.shape[:2]
        H, Hh = h0.size(-1), hh_all.size(-1)
        packed = batch_sizes is not None  # padded rows enter the weight GEMMs
        # returned to autograd, yet pooled: the slot stays busy while anything holds it, and a fresh
        # (T, B, 4H) buffer per backward costs a page fault per 4 KiB
        self.d_xw = ws.alloc("d_xw", xw.shape, zero=packed)
        self.d_a = ws.alloc("d_a", (T, B, 4 * H + 4 * Hh), zero=packed)
        self.d_z = ws.alloc("d_z", z_all.shape, zero=packed)
        self.wd = d_weight.transpose(-1, -2).contiguous()             # (3, 4, Nz, H): units innermost
        self.g_wd = torch.zeros_like(self.wd)
        self.g_bias = xw.new_zeros(4 * H) if has_bias else None
        self.dpre = xw.new_empty(B, 4 * H)

        def start(g, S):
            return xw.new_zeros(B, S) if g is None else g.clone(memory_format=torch.contiguous_format)

        self.dh, self.dc, self.dhh, self.dch = xw.new_zeros(B, H), start(d_cT, H), start(d_hhT, Hh), start(d_chT, Hh)

    def result(self):
        """What the backward loops return: (d_xw, d_a, d_z, dh, dc, dhh, dch, g_dw, g_bias)."""
        return (self.d_xw, self.d_a, self.d_z, self.dh, self.dc, self.dhh, self.dch,
                self.g_wd.transpose(-1, -2).contiguous(), self.g_bias)


def _hyper_backward_loops(lib, d_out, d_cT, d_hhT, d_chT, xw, h0, hh_all, z_all, w_cat, w_hat_hh, z_weight,
                          d_weight, norms, hnorms, mask, hmask, main, hyp, a_all, grads, hgrads, has_bias,
                          batch_sizes, ws):
    """The backward loop of _HyperLSTMFunction in one call (what _hyper_backward_kernels returns)."""
    T, B = xw.shape[:2]
    H, Hh, Nz = h0.size(-1), hh_all.size(-1), d_weight.size(-1)
    norms, hnorms = _contiguous(norms), _contiguous(hnorms)
    mask, hmask = _contiguous((mask, hmask))
    w_cat, w_hat_hh, z_weight = _contiguous((w_cat, w_hat_hh, z_weight))
    g = _HyperGrads(xw, h0, hh_all, z_all, d_weight, has_bias, batch_sizes, ws, d_cT, d_hhT, d_chT)
    d_out = None if d_out is None else d_out.contiguous()
    sizes = _sizes_tensor(batch_sizes)
    p = _kernels.HyperSeq(T=T, B=B, H=H, Hh=Hh, Nz=Nz, batch_sizes=_p(sizes), xw=_p(xw), w_cat=_p(w_cat),
                          w_hat_hh=_p(w_hat_hh), z_weight=_p(z_weight), wd=_p(g.wd), z_all=_p(z_all),
                          a_all=_p(a_all), d_out=_p(d_out), d_xw=_p(g.d_xw), d_a=_p(g.d_a), d_z=_p(g.d_z),
                          dh=_p(g.dh), dc=_p(g.dc), dhh=_p(g.dhh), dch=_p(g.dch), dpre=_p(g.dpre), g_wd=_p(g.g_wd),
                          g_bias=_p(g.g_bias), main=_lstm_struct(main, norms, 0.0, mask, grads),
                          hyp=_lstm_struct(hyp, hnorms, 0.0, hmask, hgrads))
    _loop_fn(lib, "hyper_seq_bwd", xw)(ctypes.byref(p))
    return g.result()


def _hyper_forward_kernels(lib, xw, xw_hat, h0, w_cat, w_hat_hh, z_weight, z_bias, d_weight, bias, norms, hnorms,
                           mask, hmask, eps, hyper_eps, main, hyp, out, hh_all, z_all, a_list, batch_sizes):
    """The forward loop of _HyperLSTMFunction with the per-step elementwise work in the kernels:
    per step three matrix products (torch) and three kernel calls, on the first ``batch_sizes[t]``
    rows (all B when None): a packed batch sorted by decreasing length, as cuDNN runs it."""
    k = _step_kernels(lib, xw)
    T, B = xw.shape[:2]
    H, Nz = h0.size(-1), d_weight.size(-1)
    norms, hnorms = _contiguous(norms), _contiguous(hnorms)
    wd_t = d_weight.transpose(-1, -2).contiguous()                # (3, 4, Nz, H): units innermost
    zb = torch.cat([z_bias, z_bias.new_zeros(4 * Nz)])            # z_b has no bias
    bias = xw.new_zeros(4 * H) if bias is None else bias.contiguous()  # the kernel always adds one
    hpre = xw.new_empty(B, hh_all.size(-1) * 4)
    pre = xw.new_empty(B, 4 * H)
    w_cat = _step_weight(w_cat, B, T)
    h = h0
    for t in range(T):
        bt = B if batch_sizes is None else batch_sizes[t]
        a = _linear(h[:bt], w_cat)                                # (bt, 4H + 4Hh)
        a_list.append(a)
        _mm(hh_all[t, :bt], w_hat_hh.t(), out=hpre[:bt])
        k.cell_fwd(t, bt, hpre, a[:, 4 * H:], xw_hat[t], hyp, hnorms, hyper_eps, hmask, hh_all[t + 1])
        _addmm(zb, hh_all[t + 1, :bt], z_weight.t(), out=z_all[t, :bt])
        k.hyper_fwd(bt, H, Nz, a, xw[t], z_all[t], wd_t, bias, pre)
        k.cell_fwd(t, bt, pre, None, None, main, norms, eps, mask, out[t])
        h = out[t]


def _hyper_backward_kernels(lib, d_out, d_cT, d_hhT, d_chT, xw, h0, out, hh_all, z_all, w_cat, w_hat_hh,
                            z_weight, d_weight, norms, hnorms, mask, hmask, main, hyp, a_list, grads, hgrads,
                            has_bias, batch_sizes, ws):
    """The backward loop of _HyperLSTMFunction with the per-step elementwise work in the kernels.
    Rows past ``batch_sizes[t]`` are untouched at step t, so the gradients of the final states
    enter each sequence's buffers at its own last step."""
    k = _step_kernels(lib, xw)
    T, B = xw.shape[:2]
    H, Nz = h0.size(-1), d_weight.size(-1)
    norms, hnorms = _contiguous(norms), _contiguous(hnorms)
    g = _HyperGrads(xw, h0, hh_all, z_all, d_weight, has_bias, batch_sizes, ws, d_cT, d_hhT, d_chT)
    d_xw, d_a, d_z, wd_t, g_wd, g_bias, dpre = g.d_xw, g.d_a, g.d_z, g.wd, g.g_wd, g.g_bias, g.dpre
    dh, dc, dhh, dch = g.dh, g.dc, g.dhh, g.dch
    d_out = None if d_out is None else d_out.contiguous()
    w_cat_t = _step_weight(w_cat.t(), B, T)
    for t in range(T - 1, -1, -1):
        bt = B if batch_sizes is None else batch_sizes[t]
        k.cell_bwd(t, bt, dh, None if d_out is None else d_out[t], dc, main, norms, mask, dpre, grads)
        k.hyper_bwd(bt, H, Nz, dpre, a_list[t], xw[t], z_all[t], wd_t, d_a[t], d_xw[t], d_z[t], g_wd, g_bias)
        _addmm_(dhh[:bt], d_z[t, :bt], z_weight)
        dhpre = d_a[t, :, 4 * H:]
        k.cell_bwd(t, bt, dhh, None, dch, hyp, hnorms, hmask, dhpre, hgrads)
        _mm(dhpre[:bt], w_hat_hh, out=dhh[:bt])
        prod = _linear(d_a[t, :bt], w_cat_t)
        if bt == B:
            dh = prod
        else:
            dh[:bt] = prod
    g_dw = g_wd.transpose(-1, -2).contiguous()
    return d_xw, d_a, d_z, dh, dc, dhh, dch, g_dw, g_bias


# -- the HyperLSTM layer -----------------------------------------------------------------------
def _block_diagonal(d_weight: torch.Tensor) -> torch.Tensor:
    """(3, 4, H, Nz) per-gate projections -> (3, 4 Nz, 4 H) block-diagonal matrices, so that
    ``z_k (B, 4 Nz) @ bd[k]`` gives d_k (B, 4 H) in the gate layout of the pre-activations. The
    zero blocks cost 4x the (tiny) flops but avoid per-step transposes of (B, 4, H) tensors."""
    K, G, H, Nz = d_weight.shape
    bd = d_weight.new_zeros(K, G, Nz, G, H)
    for g in range(G):
        bd[:, g, :, g, :] = d_weight[:, g].transpose(-1, -2)
    return bd.view(K, G * Nz, G * H)


class _HyperLSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        with _no_autocast(args[0].device.type):
            return _HyperLSTMFunction._forward(ctx, *args)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        with _no_autocast(ctx.device_type):
            return _HyperLSTMFunction._backward(ctx, *grads)

    @staticmethod
    def _forward(ctx, xw, xw_hat, h0, c0, hh0, ch0, w_cat, w_hat_hh, z_weight, z_bias, d_weight, bias,
                 gw, gb, cw, cb, hgw, hgb, hcw, hcb, mask, hmask, eps, hyper_eps, batch_sizes=None, owner=None):
        T, B = xw.shape[:2]
        ctx.device_type = xw.device.type
        ctx.low = w_cat.dtype if w_cat.dtype != xw.dtype else None  # mixed precision: the products' dtype
        H, Hh = h0.size(-1), hh0.size(-1)
        Nz = d_weight.size(-1)
        n = 4 * Nz
        ln = gw is not None
        ws = ctx.ws = _Workspace(owner, xw)
        main = _Saved(T, B, H, xw, ln, ws, "main.")
        hyp = _Saved(T, B, Hh, xw, ln, ws, "hyper.")
        main.c[0] = c0
        hyp.c[0] = ch0
        packed = batch_sizes is not None  # padded rows stay 0 (outputs, GEMMs)
        out = (xw.new_zeros if packed else xw.new_empty)(T, B, H)  # returned: never a work buffer
        hh_all = ws.alloc("hh_all", (T + 1, B, Hh), zero=packed)
        hh_all[0] = hh0
        z_all = ws.alloc("z_all", (T, B, 3 * n), zero=packed)
        norms, hnorms = (gw, gb, cw, cb), (hgw, hgb, hcw, hcb)
        a_list = []  # h_{t-1} @ [W_h; W_hat_h]^T per step, kept for d(d_h) in backward
        lib = _kernels_for(xw)
        ctx.lib = lib
        ctx.loops = loops = _seq_loops(lib, xw, ctx.low)
        if loops is not None:
            a_list = _hyper_forward_loops(loops, xw, xw_hat, h0, w_cat, w_hat_hh, z_weight, z_bias, d_weight, bias,
                                          norms, hnorms, mask, hmask, eps, hyper_eps, main, hyp, out, hh_all, z_all,
                                          batch_sizes, ws)
        elif lib is not None:
            _hyper_forward_kernels(lib, xw, xw_hat, h0, w_cat, w_hat_hh, z_weight, z_bias, d_weight, bias,
                                   norms, hnorms, mask, hmask, eps, hyper_eps, main, hyp, out, hh_all, z_all, a_list,
                                   batch_sizes)
        else:
            bd = _block_diagonal(d_weight)
            d_buf = xw.new_empty(3, B, 4 * H)  # per-step scratch, reused: fresh pages cost a fault each
            pre_buf = xw.new_empty(B, 4 * H)
            w_step = _step_weight(w_cat, B, T)
        h = h0
        for t in range(T if lib is None else 0):
            a = _linear(h, w_step)                                 # (B, 4H + 4Hh)
            a_list.append(a)
            hyper_pre = _addmm(xw_hat[t] + a[:, 4 * H:], hh_all[t], w_hat_hh.t())
            hh = _update_forward(t, hyper_pre, hyp, hnorms, None if hmask is None else hmask[t], hyper_eps,
                                 h_out=hh_all[t + 1])
            z = z_all[t]
            _mm(hh, z_weight.t(), out=z)
            z[:, :2 * n] += z_bias
            zz = z.view(B, 3, n).transpose(0, 1)
            # (3, B, 4H): d_h, d_x, b(z) (+ b_0 folded into the product)
            d = torch.bmm(zz, bd, out=d_buf)
            if bias is not None:
                d[2] += bias
            pre = torch.addcmul(d[2], a[:, :4 * H], d[0], out=pre_buf).addcmul_(xw[t], d[1])
            h = _update_forward(t, pre, main, norms, None if mask is None else mask[t], eps, h_out=out[t])
            _end_finished_rows(out, t, batch_sizes)
        ctx.ln = ln
        ctx.eps, ctx.hyper_eps = eps, hyper_eps
        ctx.has_bias = bias is not None
        # the step loop's per-step products may live on ctx; the loops' one buffer is a pooled work
        # buffer, saved so that autograd releases it after backward (unless the graph is retained)
        pooled_a = a_list if loops is not None else None
        ctx.a_list = None if loops is not None else a_list
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(xw, h0, out, hh_all, z_all, w_cat, w_hat_hh, z_weight, d_weight,
                              gw, gb, cw, cb, hgw, hgb, hcw, hcb, mask, hmask,
                              pooled_a, *main.tensors(), *hyp.tensors())
        last = _last_steps(batch_sizes, T, B, xw.device)
        return out, main.c[last + 1, ar(B, xw)], hh_all[last + 1, ar(B, xw)], hyp.c[last + 1, ar(B, xw)]

    @staticmethod
    def _backward(ctx, d_out, d_cT, d_hhT, d_chT):
        (xw, h0, out, hh_all, z_all, w_cat, w_hat_hh, z_weight, d_weight,
         gw, gb, cw, cb, hgw, hgb, hcw, hcb, mask, hmask, pooled_a, *rest) = ctx.saved_tensors
        a_list = ctx.a_list if pooled_a is None else pooled_a
        ln = ctx.ln
        k = 7 if ln else 2
        main = _Saved.from_tensors(rest[:k], ln)
        hyp = _Saved.from_tensors(rest[k:], ln)
        T, B = xw.shape[:2]
        H, Hh, Nz = h0.size(-1), hh_all.size(-1), d_weight.size(-1)
        n = 4 * Nz
        norms, hnorms = (gw, gb, cw, cb), (hgw, hgb, hcw, hcb)
        grads, hgrads = _ln_grads(norms, H), _ln_grads(hnorms, Hh)
        if ctx.loops is not None:
            d_xw, d_a, d_z, dh, dc, dhh, dch, g_dw, g_bias = _hyper_backward_loops(
                ctx.loops, d_out, d_cT, d_hhT, d_chT, xw, h0, hh_all, z_all, w_cat, w_hat_hh, z_weight, d_weight,
                norms, hnorms, mask, hmask, main, hyp, a_list, grads, hgrads, ctx.has_bias, ctx.batch_sizes, ctx.ws)
        elif ctx.lib is not None:
            d_xw, d_a, d_z, dh, dc, dhh, dch, g_dw, g_bias = _hyper_backward_kernels(
                ctx.lib, d_out, d_cT, d_hhT, d_chT, xw, h0, out, hh_all, z_all, w_cat, w_hat_hh, z_weight,
                d_weight, norms, hnorms, mask, hmask, main, hyp, a_list, grads, hgrads, ctx.has_bias,
                ctx.batch_sizes, ctx.ws)
        else:
            d_xw, d_a, d_z, dh, dc, dhh, dch, g_dw, g_bias = _hyper_backward_torch(
                ctx, *_packed_grads(ctx.batch_sizes, d_out, d_cT, d_hhT, d_chT), xw, h0, hh_all, z_all, w_cat, w_hat_hh, z_weight, d_weight,
                norms, hnorms, mask, hmask, main, hyp, a_list, grads, hgrads)
        # Weight gradients: one product over all T * B rows each.
        TB = T * B
        low = ctx.low
        d_a2 = d_a.view(TB, -1)
        g_cat = _recurrent_weight_grad(d_a, h0, out, low)
        d_xw_hat = d_a[:, :, 4 * H:]  # a view: returned as it is, d_a's pool slot stays busy until it is used
        g_hat_hh = _gemm(hh_all[:-1].reshape(TB, Hh).t(), d_a2[:, 4 * H:], low).t()
        g_zw = _gemm(hh_all[1:].reshape(TB, Hh).t(), d_z.view(TB, 3 * n), low).t()
        g_zb = d_z[:, :, :2 * n].sum((0, 1))
        ln_g = (grads.get("gw"), grads.get("gb"), grads.get("cw"), grads.get("cb"),
                hgrads.get("gw"), hgrads.get("gb"), hgrads.get("cw"), hgrads.get("cb"))
        return (d_xw, d_xw_hat, dh, dc, dhh, dch, g_cat, g_hat_hh, g_zw, g_zb, g_dw, g_bias,
                *ln_g, None, None, None, None, None, None)


def _hyper_backward_torch(ctx, d_out, d_cT, d_hhT, d_chT, xw, h0, hh_all, z_all, w_cat, w_hat_hh, z_weight,
                          d_weight, norms, hnorms, mask, hmask, main, hyp, a_list, grads, hgrads):
    """The backward loop of _HyperLSTMFunction in PyTorch ops (CUDA, or no compiled kernels)."""
    T, B = xw.shape[:2]
    H, Hh, Nz = h0.size(-1), hh_all.size(-1), d_weight.size(-1)
    n = 4 * Nz
    d_xw = torch.empty_like(xw)                      # (T, B, 4H)
    d_a = ctx.ws.alloc("d_a", (T, B, 4 * H + 4 * Hh))  # grads of h_{t-1} @ w_cat^T; hyper part = d xw_hat
    d_z = ctx.ws.alloc("d_z", z_all.shape)
    bd = _block_diagonal(d_weight)
    bd_t = bd.transpose(1, 2)
    g_bd = torch.zeros_like(bd)
    dd = xw.new_empty(3, B, 4 * H)                   # grads of d_h, d_x, b(z); dd[2] is d(pre)
    d_buf = torch.empty_like(dd)
    dz_buf = xw.new_empty(3, B, n)
    dpre = dd[2]
    g_bias = xw.new_zeros(4 * H) if ctx.has_bias else None
    zeros = lambda S: xw.new_zeros(B, S)  # noqa: E731
    dh = zeros(H)
    bs = ctx.batch_sizes
    if bs is None:  # every sequence ends at step T - 1: start from the final states' gradients
        dc = d_cT if d_cT is not None else zeros(H)
        dhh = d_hhT if d_hhT is not None else zeros(Hh)
        dch = d_chT if d_chT is not None else zeros(Hh)
    else:  # each sequence's final-state gradient enters at its own last step (below)
        dc, dhh, dch = zeros(H), zeros(Hh), zeros(Hh)
    w_cat_t = _step_weight(w_cat.t().contiguous(), B, T)
    for t in range(T - 1, -1, -1):
        if bs is not None:
            _enter_final_grads(t, bs, (dc, dhh, dch), (d_cT, d_hhT, d_chT))
        if d_out is not None:
            dh = dh + d_out[t]
        dc = _update_backward(t, dh, dc, main, norms, None if mask is None else mask[t], ctx.eps, grads, dpre)
        if g_bias is not None:
            g_bias += dpre.sum(0)
        zz = z_all[t].view(B, 3, n).transpose(0, 1)            # (3, B, 4 Nz)
        d = torch.bmm(zz, bd, out=d_buf)
        a = a_list[t]
        torch.mul(dpre, d[0], out=d_a[t, :, :4 * H])
        torch.mul(dpre, d[1], out=d_xw[t])
        torch.mul(dpre, a[:, :4 * H], out=dd[0])
        torch.mul(dpre, xw[t], out=dd[1])
        g_bd.baddbmm_(zz.transpose(1, 2), dd)
        dz = torch.bmm(dd, bd_t, out=dz_buf)                    # (3, B, 4 Nz)
        d_z[t].view(B, 3, n).copy_(dz.transpose(0, 1))
        dhh = _addmm(dhh, d_z[t], z_weight)
        dhpre = d_a[t, :, 4 * H:]
        dch = _update_backward(t, dhh, dch, hyp, hnorms, None if hmask is None else hmask[t],
                               ctx.hyper_eps, hgrads, dhpre)
        dhh = _mm(dhpre, w_hat_hh)
        dh = _linear(d_a[t], w_cat_t)
    G = 4
    g_bd = g_bd.view(3, G, Nz, G, H)
    g_dw = torch.stack([g_bd[:, g, :, g, :] for g in range(G)], dim=1).transpose(-1, -2)
    return d_xw, d_a, d_z, dh, dc, dhh, dch, g_dw, g_bias


def hyper_lstm_sequence(cell, x: torch.Tensor, state, batch_sizes=None, row_order=None):
    """The fused forward of ``HyperLSTMCell`` over a (T, B, I) sequence, or None when the cell's
    configuration is not covered (the caller then runs the eager ``step`` loop). ``batch_sizes``
    and ``row_order``: see ``packed_forward``."""
    if not fused_enabled(cell, x):
        return None
    T, B = x.shape[:2]
    H, Hh = cell.hidden_size, cell.hyper_size
    hyper = cell.hyper
    low = _amp_dtype(cell, x)  # mixed precision: the products' dtype (see _amp_dtype)
    # The same products as cell.input_projection, kept apart (no (T, B, 4H + 4Hh) concatenation).
    xw = F.linear(x, cell.weight_ih)
    xw_hat = F.linear(x, hyper.weight_ih[:, H:], hyper.bias)
    if low is not None:  # autocast ran the input products in low precision; the rest is float32
        xw, xw_hat, state = xw.float(), xw_hat.float(), tuple(s.float() for s in state)
    xw, xw_hat = xw.contiguous(), xw_hat.contiguous()
    h0, c0, hh0, ch0 = (s.contiguous() for s in state)  # the step kernels read rows by pointer
    w_cat = _prepared(cell, f"w_cat.{low}", (cell.weight_hh, hyper.weight_ih),
                      lambda: _cast(torch.cat([cell.weight_hh, hyper.weight_ih[:, :H]], dim=0), low))
    training = cell.training
    rates = [(Hh, hyper.recurrent_dropout if training and hyper.recurrent_dropout > 0 else None),
             (H, cell.recurrent_dropout if training and cell.recurrent_dropout > 0 else None)]
    hmask, mask = _reorder(_dropout_masks(rates, T, B, xw), row_order)
    norms, hnorms = _norm_params(cell), _norm_params(hyper)
    sc = cell.scaling
    out, cT, hhT, chT = _HyperLSTMFunction.apply(
        xw, xw_hat, h0, c0, hh0, ch0, w_cat, _low_weight(hyper, "weight_hh", low),
        _low_weight(sc, "z_weight", low), sc.z_bias, sc.d_weight, sc.bias,
        *norms, *hnorms, mask, hmask, _eps(cell), _eps(hyper), batch_sizes, cell)
    return out, (_final_h(out, batch_sizes), cT, hhT, chT)


# -- the LSTM layer ----------------------------------------------------------------------------
class _LSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        with _no_autocast(args[0].device.type):
            return _LSTMFunction._forward(ctx, *args)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        with _no_autocast(ctx.device_type):
            return _LSTMFunction._backward(ctx, *grads)

    @staticmethod
    def _forward(ctx, xw, h0, c0, w_hh, gw, gb, cw, cb, mask, eps, batch_sizes=None, owner=None):
        T, B = xw.shape[:2]
        ctx.device_type = xw.device.type
        ctx.low = w_hh.dtype if w_hh.dtype != xw.dtype else None  # mixed precision: the products' dtype
        H = h0.size(-1)
        ln = gw is not None
        sv = _Saved(T, B, H, xw, ln, _Workspace(owner, xw), "lstm.")
        sv.c[0] = c0
        out = (xw.new_empty if batch_sizes is None else xw.new_zeros)(T, B, H)
        norms = (gw, gb, cw, cb)
        lib = _kernels_for(xw)
        ctx.lib = lib
        ctx.loops = loops = _seq_loops(lib, xw, ctx.low)
        h = h0
        w_step = None if loops is not None else _step_weight(w_hh, B, T)  # the loops use the weight as it is
        if loops is not None:
            sizes, pre = _sizes_tensor(batch_sizes), xw.new_empty(B, 4 * H)
            mask, w = _contiguous((mask, w_hh))
            p = _kernels.LstmSeq(T=T, B=B, batch_sizes=_p(sizes), xw=_p(xw), h0=_p(h0), w_hh=_p(w), out=_p(out),
                                 pre=_p(pre), lstm=_lstm_struct(sv, _contiguous(norms), eps, mask))
            _loop_fn(loops, "lstm_seq_fwd", xw)(ctypes.byref(p))
        elif lib is not None:
            k = _step_kernels(lib, xw)
            for t in range(T):
                bt = B if batch_sizes is None else batch_sizes[t]
                pre = _linear(h[:bt], w_step)
                k.cell_fwd(t, bt, pre, xw[t], None, sv, _contiguous(norms), eps, mask, out[t])
                h = out[t]
        for t in range(T if lib is None else 0):
            pre = _linear(h, w_step)
            pre += xw[t]
            h = _update_forward(t, pre, sv, norms, None if mask is None else mask[t], eps, h_out=out[t])
            _end_finished_rows(out, t, batch_sizes)
        ctx.ln, ctx.eps, ctx.batch_sizes = ln, eps, batch_sizes
        ctx.save_for_backward(h0, out, w_hh, gw, gb, cw, cb, mask, *sv.tensors())
        return out, sv.c[_last_steps(batch_sizes, T, B, xw.device) + 1, ar(B, xw)]

    @staticmethod
    def _backward(ctx, d_out, d_cT):
        h0, out, w_hh, gw, gb, cw, cb, mask, *rest = ctx.saved_tensors
        sv = _Saved.from_tensors(rest, ctx.ln)
        T, B, H = out.shape
        norms = (gw, gb, cw, cb)
        grads = _ln_grads(norms, H)
        d_xw = (out.new_empty if ctx.batch_sizes is None else out.new_zeros)(T, B, 4 * H)
        dh = out.new_zeros(B, H)
        dc = d_cT if d_cT is not None else out.new_zeros(B, H)
        w_t = None if ctx.loops is not None else _step_weight(w_hh.t(), B, T)
        if ctx.loops is not None:
            dc = dc.clone(memory_format=torch.contiguous_format)  # updated in place
            d_out = d_out.contiguous() if d_out is not None else None
            sizes = _sizes_tensor(ctx.batch_sizes)
            mask, w = _contiguous((mask, w_hh))
            p = _kernels.LstmSeq(T=T, B=B, batch_sizes=_p(sizes), h0=_p(h0), w_hh=_p(w), d_out=_p(d_out),
                                 d_xw=_p(d_xw), dh=_p(dh), dc=_p(dc),
                                 lstm=_lstm_struct(sv, _contiguous(norms), 0.0, mask, grads))
            _loop_fn(ctx.loops, "lstm_seq_bwd", out)(ctypes.byref(p))
        elif ctx.lib is not None:
            k = _step_kernels(ctx.lib, out)
            dc = dc.clone(memory_format=torch.contiguous_format)  # updated in place
            d_out = d_out.contiguous() if d_out is not None else None
            for t in range(T - 1, -1, -1):
                bt = B if ctx.batch_sizes is None else ctx.batch_sizes[t]
                k.cell_bwd(t, bt, dh, None if d_out is None else d_out[t], dc, sv, _contiguous(norms), mask,
                           d_xw[t], grads)
                prod = _linear(d_xw[t, :bt], w_t)
                if bt == B:
                    dh = prod
                else:
                    dh[:bt] = prod
        if ctx.lib is None and ctx.batch_sizes is not None:
            d_out, d_cT = _packed_grads(ctx.batch_sizes, d_out, d_cT)
            dc = out.new_zeros(B, H)
        for t in range(T - 1, -1, -1) if ctx.lib is None else ():
            if ctx.batch_sizes is not None:
                _enter_final_grads(t, ctx.batch_sizes, (dc,), (d_cT,))
            if d_out is not None:
                dh = dh + d_out[t]
            dc = _update_backward(t, dh, dc, sv, norms, None if mask is None else mask[t], ctx.eps, grads, d_xw[t])
            dh = _linear(d_xw[t], w_t)
        g_hh = _recurrent_weight_grad(d_xw, h0, out, ctx.low)
        return (d_xw, dh, dc, g_hh, grads.get("gw"), grads.get("gb"), grads.get("cw"), grads.get("cb"),
                None, None, None, None)


def lstm_sequence(cell, x: torch.Tensor, state, batch_sizes=None, row_order=None):
    """The fused forward of ``LSTMCell`` over a (T, B, I) sequence, or None when not covered."""
    if not fused_enabled(cell, x):
        return None
    h0, c0 = state
    T, B = x.shape[:2]
    H = cell.hidden_size
    rd = cell.recurrent_dropout if cell.training and cell.recurrent_dropout > 0 else None
    if cell.gate_norm is None and rd is None and batch_sizes is None:
        return _torch_lstm(cell, x, h0, c0)
    low = _amp_dtype(cell, x)  # mixed precision: the products' dtype (see _amp_dtype)
    xw = cell.input_projection(x)
    if low is not None:  # autocast ran the input product in low precision; the rest is float32
        xw, h0, c0 = xw.float(), h0.float(), c0.float()
    xw = xw.contiguous()
    (mask,) = _reorder(_dropout_masks([(H, rd)], T, B, xw), row_order)
    h0, c0 = h0.contiguous(), c0.contiguous()
    out, cT = _LSTMFunction.apply(xw, h0, c0, _low_weight(cell, "weight_hh", low), *_norm_params(cell), mask,
                                  _eps(cell), batch_sizes, cell)
    return out, (_final_h(out, batch_sizes), cT)


# -- padded batches (PackedSequence input) -------------------------------------------------------
# Packed batches on the PyTorch-op path (CUDA, or no compiled kernels): every step runs on all B
# rows (static shapes; on a GPU the finished rows cost nothing extra) and the finished rows are
# made inert instead of skipped. Rows are sorted by decreasing length, so the sequences ending at
# step t are rows [batch_sizes[t + 1], batch_sizes[t]). Forward: a finished row's outputs are set
# to 0 (what the eager loop returns there) and its state, carried on from padding input, is never
# read (final states are gathered at each row's last step). Backward: the gradients entering a
# finished row are zero, so everything it contributes is exactly zero; a row's final-state
# gradient enters at its own last step.
def _end_finished_rows(out: torch.Tensor, t: int, batch_sizes) -> None:
    if batch_sizes is not None and batch_sizes[t] < out.size(1):
        out[t, batch_sizes[t]:] = 0


def _packed_grads(batch_sizes, d_out, *final):
    """(d_out with finished rows' steps zeroed, *final): for the PyTorch-op backward loops."""
    if batch_sizes is not None and d_out is not None:
        d_out = d_out.clone()
        for t, bt in enumerate(batch_sizes):
            d_out[t, bt:] = 0
    return (d_out, *final)


def _enter_final_grads(t: int, batch_sizes, running, finals) -> None:
    lo = batch_sizes[t + 1] if t + 1 < len(batch_sizes) else 0
    hi = batch_sizes[t]
    if hi > lo:
        for acc, g in zip(running, finals):
            if g is not None:
                acc[lo:hi] += g[lo:hi]


def _reorder(masks, row_order):
    return [m if m is None or row_order is None else m[:, row_order] for m in masks]


def _final_h(out: torch.Tensor, batch_sizes) -> torch.Tensor:
    if batch_sizes is None:
        return out[-1]
    T, B = out.shape[:2]
    return out[_last_steps(batch_sizes, T, B, out.device), ar(B, out)]


def packed_forward(cell, x: torch.Tensor, state, mask: torch.Tensor):
    """Fused forward of a padded batch: x (T, B, I) in the caller's row order, ``mask`` (T, B, 1)
    True on each sequence's steps (what ``RecurrentLayers`` builds from a PackedSequence). Like the
    eager loop, outputs past a sequence's end are 0 and its final state is the one at its last step.

    The rows are sorted by decreasing length so that step t runs on the first ``batch_sizes[t]``
    rows only, as cuDNN runs a packed batch: no work, and no state update, for finished sequences
    (with the compiled kernels; the PyTorch-op path keeps shapes static, see ``_end_finished_rows``).
    None (run the eager loop) when the cell's configuration has no fused path.
    """
    if (not fused_enabled(cell, x) or not getattr(cell, "fused_supported", True)
            or getattr(cell, "fused_forward", None) is None):
        return None
    lengths = mask[:, :, 0].sum(0).cpu()
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_len = lengths[order]
    T = int(sorted_len[0])
    batch_sizes = (sorted_len.unsqueeze(0) > torch.arange(T).unsqueeze(1)).sum(1).tolist()
    order = order.to(x.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=x.device)
    run = hyper_lstm_sequence if hasattr(cell, "scaling") else lstm_sequence
    result = run(cell, x[:T].index_select(1, order), tuple(s.index_select(0, order) for s in state),
                 batch_sizes=batch_sizes, row_order=order)
    if result is None:
        return None
    out, final = result
    out = out.index_select(1, inverse)
    if T < x.size(0):
        out = torch.cat([out, out.new_zeros(x.size(0) - T, *out.shape[1:])])
    return out, tuple(s.index_select(0, inverse) for s in final)


def _torch_lstm(cell, x, h0, c0):
    """Plain LSTM: torch's fused kernel (oneDNN on CPU, cuDNN on GPU), gates permuted to i, f, g, o."""
    H = cell.hidden_size

    def permute(w):  # gate blocks by slicing: no index tensor to copy to the device (CUDA-graph capture)
        blocks = w.view(4, H, *w.shape[1:])
        return torch.cat([blocks[k] for k in _GATE_PERM]).reshape(w.shape)

    def build():
        weights = [permute(cell.weight_ih), permute(cell.weight_hh)]
        if cell.bias is not None:
            weights += [permute(cell.bias), torch.zeros_like(cell.bias)]
        return weights

    params = (cell.weight_ih, cell.weight_hh) + ((cell.bias,) if cell.bias is not None else ())
    weights = _prepared(cell, "torch_lstm", params, build)
    out, hT, cT = torch._VF.lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)), weights, cell.bias is not None,
                                 1, 0.0, cell.training, False, False)
    return out, (hT[0], cT[0])

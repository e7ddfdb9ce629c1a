"""Triton versions of the fused step kernels (``_kernels/lstm_kernels.cpp``) for CUDA tensors.

The compiled C++ kernels do the per-step elementwise work of the fused LSTM / HyperLSTM loops on
CPU; on CUDA the same work would otherwise be ~200 small PyTorch ops per step. The kernels here
compute exactly what the four C++ entry points compute (same inputs, outputs and saved tensors,
the same formulas and the same "first B rows" semantics for packed batches), so ``_fused.py``
drives both through one interface (``cell_fwd``, ``cell_bwd``, ``hyper_fwd``, ``hyper_bwd``);
they take tensors instead of raw pointers. Per step and direction that is five launches forward
(the LSTM updates with their layer norms and dropout masks, and the hyper scaling of the
pre-activations) and six or eight backward, instead of the PyTorch-op path's hundreds.

Work split: ``cell_fwd``/``cell_bwd`` run one program per batch row, looping over the S units in
blocks of ``BLOCK`` (two-pass layer-norm moments, as the C++ and ``torch.native_layer_norm``); the
layer-norm parameter gradients, sums over rows, are written per row into a scratch buffer and
summed by a second small kernel in row order (deterministic, no atomics). ``hyper_fwd`` runs one
program per (row, gate, block of units); ``hyper_bwd`` one per (row, gate) for d(a), d(xw), dz and
one per (gate, block of units) for the weight and bias gradients, which loop over the rows.

float32 only (layer-norm statistics and cell states included); other dtypes keep to the PyTorch
ops. Importing this module imports triton (``available()`` says whether that worked). With
``TRITON_INTERPRET=1`` set before this module is imported, the kernels run in Triton's
interpreter on CPU tensors: that is how the tests check them against the C++ kernels and the
PyTorch ops on a machine without a GPU (tests/test_triton_kernels.py).
"""
from __future__ import annotations

import os

import torch

ENV_VAR = "HYPERNETWORKS_TRITON"

try:
    import triton
    import triton.language as tl
except Exception as e:  # ImportError, or a broken install
    triton = None
    tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
else:
    _IMPORT_ERROR = ""


def available() -> bool:
    """Whether triton imported and ``HYPERNETWORKS_TRITON`` is not 0."""
    return triton is not None and os.environ.get(ENV_VAR, "1") not in ("0", "false", "False")


def why_unavailable() -> str:
    if triton is None:
        return f"triton does not import ({_IMPORT_ERROR})"
    return f"{ENV_VAR}=0" if not available() else ""


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


if triton is not None:

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _tanh(x):
        # As tanh_fast in lstm_kernels.cpp: |x| < 0.625 the Cephes odd polynomial (no cancellation
        # near 0), else 1 - 2 / (e^{2|x|} + 1) with the sign of x.
        ax = tl.abs(x)
        z = x * x
        p = z * -5.70498872745e-3 + 2.06390887954e-2
        p = p * z - 5.37397155531e-2
        p = p * z + 1.33314422036e-1
        p = p * z - 3.33332819422e-1
        small = x + x * z * p
        e = tl.exp(-2.0 * ax)
        big = (1.0 - e) / (1.0 + e)
        big = tl.where(x < 0, -big, big)
        return tl.where(ax < 0.625, small, big)

    @triton.jit
    def _pre_block(pre_row, add1_row, add2_row, off, m, ADD1: tl.constexpr, ADD2: tl.constexpr):
        v = tl.load(pre_row + off, mask=m, other=0.0)
        if ADD1:
            v = v + tl.load(add1_row + off, mask=m, other=0.0)
        if ADD2:
            v = v + tl.load(add2_row + off, mask=m, other=0.0)
        return v

    @triton.jit
    def _cell_fwd_kernel(pre, pre_s, add1, add1_s, add2, add2_s, gw, gb, cw, cb, eps, mask, c_prev,
                         act, c_next, h, h_s, gx, grstd, cmean, crstd, tc, S,
                         ADD1: tl.constexpr, ADD2: tl.constexpr, LNG: tl.constexpr, LNC: tl.constexpr,
                         MASK: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        G = 4 * S
        p_row = pre + b * pre_s
        q1_row = add1 + b * add1_s
        q2_row = add2 + b * add2_s
        a_row = act + b * G
        cols = tl.arange(0, BLOCK)
        mean0 = 0.0
        mean1 = 0.0
        mean2 = 0.0
        mean3 = 0.0
        rstd0 = 1.0
        rstd1 = 1.0
        rstd2 = 1.0
        rstd3 = 1.0
        if LNG:  # moments of each gate block: two passes
            s0 = tl.zeros([BLOCK], tl.float32)
            s1 = tl.zeros([BLOCK], tl.float32)
            s2 = tl.zeros([BLOCK], tl.float32)
            s3 = tl.zeros([BLOCK], tl.float32)
            for j0 in range(0, S, BLOCK):
                j = j0 + cols
                m = j < S
                s0 += _pre_block(p_row, q1_row, q2_row, j, m, ADD1, ADD2)
                s1 += _pre_block(p_row, q1_row, q2_row, S + j, m, ADD1, ADD2)
                s2 += _pre_block(p_row, q1_row, q2_row, 2 * S + j, m, ADD1, ADD2)
                s3 += _pre_block(p_row, q1_row, q2_row, 3 * S + j, m, ADD1, ADD2)
            mean0 = tl.sum(s0, 0) / S
            mean1 = tl.sum(s1, 0) / S
            mean2 = tl.sum(s2, 0) / S
            mean3 = tl.sum(s3, 0) / S
            v0 = tl.zeros([BLOCK], tl.float32)
            v1 = tl.zeros([BLOCK], tl.float32)
            v2 = tl.zeros([BLOCK], tl.float32)
            v3 = tl.zeros([BLOCK], tl.float32)
            for j0 in range(0, S, BLOCK):
                j = j0 + cols
                m = j < S
                d0 = tl.where(m, _pre_block(p_row, q1_row, q2_row, j, m, ADD1, ADD2) - mean0, 0.0)
                d1 = tl.where(m, _pre_block(p_row, q1_row, q2_row, S + j, m, ADD1, ADD2) - mean1, 0.0)
                d2 = tl.where(m, _pre_block(p_row, q1_row, q2_row, 2 * S + j, m, ADD1, ADD2) - mean2, 0.0)
                d3 = tl.where(m, _pre_block(p_row, q1_row, q2_row, 3 * S + j, m, ADD1, ADD2) - mean3, 0.0)
                v0 += d0 * d0
                v1 += d1 * d1
                v2 += d2 * d2
                v3 += d3 * d3
            rstd0 = 1.0 / tl.sqrt_rn(tl.sum(v0, 0) / S + eps)
            rstd1 = 1.0 / tl.sqrt_rn(tl.sum(v1, 0) / S + eps)
            rstd2 = 1.0 / tl.sqrt_rn(tl.sum(v2, 0) / S + eps)
            rstd3 = 1.0 / tl.sqrt_rn(tl.sum(v3, 0) / S + eps)
            tl.store(grstd + b * 4, rstd0)
            tl.store(grstd + b * 4 + 1, rstd1)
            tl.store(grstd + b * 4 + 2, rstd2)
            tl.store(grstd + b * 4 + 3, rstd3)
        csum = tl.zeros([BLOCK], tl.float32)
        for j0 in range(0, S, BLOCK):
            j = j0 + cols
            m = j < S
            x0 = _pre_block(p_row, q1_row, q2_row, j, m, ADD1, ADD2)
            x1 = _pre_block(p_row, q1_row, q2_row, S + j, m, ADD1, ADD2)
            x2 = _pre_block(p_row, q1_row, q2_row, 2 * S + j, m, ADD1, ADD2)
            x3 = _pre_block(p_row, q1_row, q2_row, 3 * S + j, m, ADD1, ADD2)
            if LNG:
                x_row = gx + b * G
                y0 = (x0 - mean0) * rstd0
                y1 = (x1 - mean1) * rstd1
                y2 = (x2 - mean2) * rstd2
                y3 = (x3 - mean3) * rstd3
                tl.store(x_row + j, y0, mask=m)
                tl.store(x_row + S + j, y1, mask=m)
                tl.store(x_row + 2 * S + j, y2, mask=m)
                tl.store(x_row + 3 * S + j, y3, mask=m)
                x0 = y0 * tl.load(gw + j, mask=m, other=0.0) + tl.load(gb + j, mask=m, other=0.0)
                x1 = y1 * tl.load(gw + S + j, mask=m, other=0.0) + tl.load(gb + S + j, mask=m, other=0.0)
                x2 = y2 * tl.load(gw + 2 * S + j, mask=m, other=0.0) + tl.load(gb + 2 * S + j, mask=m, other=0.0)
                x3 = y3 * tl.load(gw + 3 * S + j, mask=m, other=0.0) + tl.load(gb + 3 * S + j, mask=m, other=0.0)
            ai = _sigmoid(x0)
            ag = _tanh(x1)
            af = _sigmoid(x2)
            ao = _sigmoid(x3)
            tl.store(a_row + j, ai, mask=m)
            tl.store(a_row + S + j, ag, mask=m)
            tl.store(a_row + 2 * S + j, af, mask=m)
            tl.store(a_row + 3 * S + j, ao, mask=m)
            gm = ag
            if MASK:
                gm = ag * tl.load(mask + b * S + j, mask=m, other=0.0)
            cp = tl.load(c_prev + b * S + j, mask=m, other=0.0)
            cn = af * cp + ai * gm
            tl.store(c_next + b * S + j, cn, mask=m)
            if LNC:
                csum += tl.where(m, cn, 0.0)
            else:
                tl.store(h + b * h_s + j, ao * _tanh(cn), mask=m)
        if LNC:  # layer norm of the new cell: its moments, then tanh(LN(c)) and h
            tl.debug_barrier()
            cm = tl.sum(csum, 0) / S
            cv = tl.zeros([BLOCK], tl.float32)
            for j0 in range(0, S, BLOCK):
                j = j0 + cols
                m = j < S
                d = tl.where(m, tl.load(c_next + b * S + j, mask=m, other=0.0) - cm, 0.0)
                cv += d * d
            cr = 1.0 / tl.sqrt_rn(tl.sum(cv, 0) / S + eps)
            tl.store(cmean + b, cm)
            tl.store(crstd + b, cr)
            for j0 in range(0, S, BLOCK):
                j = j0 + cols
                m = j < S
                cn = tl.load(c_next + b * S + j, mask=m, other=0.0)
                ao = tl.load(a_row + 3 * S + j, mask=m, other=0.0)
                w = tl.load(cw + j, mask=m, other=0.0)
                bb = tl.load(cb + j, mask=m, other=0.0)
                t = _tanh((cn - cm) * cr * w + bb)
                tl.store(tc + b * S + j, t, mask=m)
                tl.store(h + b * h_s + j, ao * t, mask=m)

    @triton.jit
    def _cell_bwd_kernel(dh, dh_add, dc, act, c_prev, c_next, tc, mask, gw, cw, gx, grstd, cmean, crstd,
                         dpre, dpre_s, dc_prev, part, part_s, S,
                         ADD: tl.constexpr, LNG: tl.constexpr, LNC: tl.constexpr, MASK: tl.constexpr,
                         BLOCK: tl.constexpr):
        # part: per-row contributions to the layer-norm parameter gradients, (rows, 10 S):
        # [gw (4S) | gb (4S) | cw (S) | cb (S)], summed over rows by _ln_grad_kernel.
        b = tl.program_id(0).to(tl.int64)
        G = 4 * S
        a_row = act + b * G
        d_row = dpre + b * dpre_s
        p_row = part + b * part_s
        cols = tl.arange(0, BLOCK)
        mean = 0.0
        rstd = 1.0
        m1 = 0.0
        m2 = 0.0
        if LNC:  # layer norm of the cell: the two row means of its backward
            mean = tl.load(cmean + b)
            rstd = tl.load(crstd + b)
            s1 = tl.zeros([BLOCK], tl.float32)
            s2 = tl.zeros([BLOCK], tl.float32)
            for j0 in range(0, S, BLOCK):
                j = j0 + cols
                m = j < S
                dhj = tl.load(dh + b * S + j, mask=m, other=0.0)
                if ADD:
                    dhj = dhj + tl.load(dh_add + b * S + j, mask=m, other=0.0)
                ao = tl.load(a_row + 3 * S + j, mask=m, other=0.0)
                t = tl.load(tc + b * S + j, mask=m, other=0.0)
                dtc = dhj * ao * (1.0 - t * t)
                xhat = (tl.load(c_next + b * S + j, mask=m, other=0.0) - mean) * rstd
                dx = dtc * tl.load(cw + j, mask=m, other=0.0)
                s1 += tl.where(m, dx, 0.0)
                s2 += tl.where(m, dx * xhat, 0.0)
                tl.store(p_row + 8 * S + j, dtc * xhat, mask=m)
                tl.store(p_row + 9 * S + j, dtc, mask=m)
            m1 = tl.sum(s1, 0) / S
            m2 = tl.sum(s2, 0) / S
        u10 = tl.zeros([BLOCK], tl.float32)
        u11 = tl.zeros([BLOCK], tl.float32)
        u12 = tl.zeros([BLOCK], tl.float32)
        u13 = tl.zeros([BLOCK], tl.float32)
        u20 = tl.zeros([BLOCK], tl.float32)
        u21 = tl.zeros([BLOCK], tl.float32)
        u22 = tl.zeros([BLOCK], tl.float32)
        u23 = tl.zeros([BLOCK], tl.float32)
        for j0 in range(0, S, BLOCK):
            j = j0 + cols
            m = j < S
            dhj = tl.load(dh + b * S + j, mask=m, other=0.0)
            if ADD:
                dhj = dhj + tl.load(dh_add + b * S + j, mask=m, other=0.0)
            ai = tl.load(a_row + j, mask=m, other=0.0)
            ag = tl.load(a_row + S + j, mask=m, other=0.0)
            af = tl.load(a_row + 2 * S + j, mask=m, other=0.0)
            ao = tl.load(a_row + 3 * S + j, mask=m, other=0.0)
            cn = tl.load(c_next + b * S + j, mask=m, other=0.0)
            cp = tl.load(c_prev + b * S + j, mask=m, other=0.0)
            dcr = tl.load(dc + b * S + j, mask=m, other=0.0)
            if LNC:
                t = tl.load(tc + b * S + j, mask=m, other=0.0)
            else:
                t = _tanh(cn)
            dtc = dhj * ao * (1.0 - t * t)
            if LNC:
                xhat = (cn - mean) * rstd
                dct = dcr + (dtc * tl.load(cw + j, mask=m, other=0.0) - m1 - xhat * m2) * rstd
            else:
                dct = dcr + dtc
            if MASK:
                mk = tl.load(mask + b * S + j, mask=m, other=0.0)
                gm = ag * mk
                dg = dct * ai * mk
            else:
                gm = ag
                dg = dct * ai
            d0 = dct * gm * ai * (1.0 - ai)
            d1 = dg * (1.0 - ag * ag)
            d2 = dct * cp * af * (1.0 - af)
            d3 = dhj * t * ao * (1.0 - ao)
            tl.store(d_row + j, d0, mask=m)
            tl.store(d_row + S + j, d1, mask=m)
            tl.store(d_row + 2 * S + j, d2, mask=m)
            tl.store(d_row + 3 * S + j, d3, mask=m)
            tl.store(dc_prev + b * S + j, dct * af, mask=m)  # dc may alias dc_prev: same element
            if LNG:  # layer norm of each gate block: parameter-gradient terms and the row sums
                x_row = gx + b * G
                w0 = tl.load(gw + j, mask=m, other=0.0)
                w1 = tl.load(gw + S + j, mask=m, other=0.0)
                w2 = tl.load(gw + 2 * S + j, mask=m, other=0.0)
                w3 = tl.load(gw + 3 * S + j, mask=m, other=0.0)
                x0 = tl.load(x_row + j, mask=m, other=0.0)
                x1 = tl.load(x_row + S + j, mask=m, other=0.0)
                x2 = tl.load(x_row + 2 * S + j, mask=m, other=0.0)
                x3 = tl.load(x_row + 3 * S + j, mask=m, other=0.0)
                tl.store(p_row + j, d0 * x0, mask=m)
                tl.store(p_row + S + j, d1 * x1, mask=m)
                tl.store(p_row + 2 * S + j, d2 * x2, mask=m)
                tl.store(p_row + 3 * S + j, d3 * x3, mask=m)
                tl.store(p_row + 4 * S + j, d0, mask=m)
                tl.store(p_row + 5 * S + j, d1, mask=m)
                tl.store(p_row + 6 * S + j, d2, mask=m)
                tl.store(p_row + 7 * S + j, d3, mask=m)
                u10 += tl.where(m, d0 * w0, 0.0)
                u11 += tl.where(m, d1 * w1, 0.0)
                u12 += tl.where(m, d2 * w2, 0.0)
                u13 += tl.where(m, d3 * w3, 0.0)
                u20 += tl.where(m, d0 * w0 * x0, 0.0)
                u21 += tl.where(m, d1 * w1 * x1, 0.0)
                u22 += tl.where(m, d2 * w2 * x2, 0.0)
                u23 += tl.where(m, d3 * w3 * x3, 0.0)
        if LNG:
            tl.debug_barrier()
            n10 = tl.sum(u10, 0) / S
            n11 = tl.sum(u11, 0) / S
            n12 = tl.sum(u12, 0) / S
            n13 = tl.sum(u13, 0) / S
            n20 = tl.sum(u20, 0) / S
            n21 = tl.sum(u21, 0) / S
            n22 = tl.sum(u22, 0) / S
            n23 = tl.sum(u23, 0) / S
            r0 = tl.load(grstd + b * 4)
            r1 = tl.load(grstd + b * 4 + 1)
            r2 = tl.load(grstd + b * 4 + 2)
            r3 = tl.load(grstd + b * 4 + 3)
            x_row = gx + b * G
            for j0 in range(0, S, BLOCK):
                j = j0 + cols
                m = j < S
                y0 = tl.load(d_row + j, mask=m, other=0.0)
                y1 = tl.load(d_row + S + j, mask=m, other=0.0)
                y2 = tl.load(d_row + 2 * S + j, mask=m, other=0.0)
                y3 = tl.load(d_row + 3 * S + j, mask=m, other=0.0)
                w0 = tl.load(gw + j, mask=m, other=0.0)
                w1 = tl.load(gw + S + j, mask=m, other=0.0)
                w2 = tl.load(gw + 2 * S + j, mask=m, other=0.0)
                w3 = tl.load(gw + 3 * S + j, mask=m, other=0.0)
                x0 = tl.load(x_row + j, mask=m, other=0.0)
                x1 = tl.load(x_row + S + j, mask=m, other=0.0)
                x2 = tl.load(x_row + 2 * S + j, mask=m, other=0.0)
                x3 = tl.load(x_row + 3 * S + j, mask=m, other=0.0)
                tl.store(d_row + j, (y0 * w0 - n10 - x0 * n20) * r0, mask=m)
                tl.store(d_row + S + j, (y1 * w1 - n11 - x1 * n21) * r1, mask=m)
                tl.store(d_row + 2 * S + j, (y2 * w2 - n12 - x2 * n22) * r2, mask=m)
                tl.store(d_row + 3 * S + j, (y3 * w3 - n13 - x3 * n23) * r3, mask=m)

    @triton.jit
    def _ln_grad_kernel(part, part_s, B, S, g_gw, g_gb, g_cw, g_cb, LNG: tl.constexpr, LNC: tl.constexpr,
                        BLOCK: tl.constexpr):
        # Adds the per-row terms of _cell_bwd_kernel's part buffer, summed in row order, into the
        # layer-norm parameter gradients: columns [j0, j0 + BLOCK) of the 4S gate units and, for
        # j < S, of the S cell units.
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if LNG:
            m = j < 4 * S
            aw = tl.zeros([BLOCK], tl.float32)
            ab = tl.zeros([BLOCK], tl.float32)
            for r in range(0, B):
                row = part + r * part_s
                aw += tl.load(row + j, mask=m, other=0.0)
                ab += tl.load(row + 4 * S + j, mask=m, other=0.0)
            tl.store(g_gw + j, tl.load(g_gw + j, mask=m, other=0.0) + aw, mask=m)
            tl.store(g_gb + j, tl.load(g_gb + j, mask=m, other=0.0) + ab, mask=m)
        if LNC:
            mc = j < S
            aw = tl.zeros([BLOCK], tl.float32)
            ab = tl.zeros([BLOCK], tl.float32)
            for r in range(0, B):
                row = part + r * part_s
                aw += tl.load(row + 8 * S + j, mask=mc, other=0.0)
                ab += tl.load(row + 9 * S + j, mask=mc, other=0.0)
            tl.store(g_cw + j, tl.load(g_cw + j, mask=mc, other=0.0) + aw, mask=mc)
            tl.store(g_cb + j, tl.load(g_cb + j, mask=mc, other=0.0) + ab, mask=mc)

    @triton.jit
    def _hyper_fwd_kernel(a, a_s, xw, xw_s, z, z_s, wd, bias, pre, pre_s, H, Nz, BLOCK: tl.constexpr):
        # pre[b, gH + j] = d_b + a * d_h + xw * d_x, d_k[b, g, j] = sum_q z[b, k, g, q] wd[k, g, q, j]
        # (+ bias in d_b); one program per (row b, gate g, block of units j).
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        j = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        m = j < H
        off = g * H + j
        n = 4 * Nz
        z_row = z + b * z_s + g * Nz
        d0 = tl.zeros([BLOCK], tl.float32)
        d1 = tl.zeros([BLOCK], tl.float32)
        d2 = tl.load(bias + off, mask=m, other=0.0)
        for q in range(0, Nz):
            z0 = tl.load(z_row + q)
            z1 = tl.load(z_row + n + q)
            z2 = tl.load(z_row + 2 * n + q)
            w0 = tl.load(wd + ((0 * 4 + g) * Nz + q) * H + j, mask=m, other=0.0)
            w1 = tl.load(wd + ((1 * 4 + g) * Nz + q) * H + j, mask=m, other=0.0)
            w2 = tl.load(wd + ((2 * 4 + g) * Nz + q) * H + j, mask=m, other=0.0)
            d0 += z0 * w0
            d1 += z1 * w1
            d2 += z2 * w2
        ar = tl.load(a + b * a_s + off, mask=m, other=0.0)
        xr = tl.load(xw + b * xw_s + off, mask=m, other=0.0)
        tl.store(pre + b * pre_s + off, d2 + ar * d0 + xr * d1, mask=m)

    @triton.jit
    def _hyper_bwd_rows_kernel(dpre, dpre_s, a, a_s, xw, xw_s, z, z_s, wd, d_a, da_s, d_xw, dxw_s, dz, dz_s,
                               H, Nz, BLOCK: tl.constexpr):
        # Per (row b, gate g): d(a) = dpre * d_h, d(xw) = dpre * d_x over the gate's units, and
        # dz[b, k, g, q] = sum_j dd_k[j] wd[k, g, q, j] with dd = (dpre * a, dpre * xw, dpre).
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        n = 4 * Nz
        z_row = z + b * z_s + g * Nz
        dp_row = dpre + b * dpre_s + g * H
        a_row = a + b * a_s + g * H
        x_row = xw + b * xw_s + g * H
        for j0 in range(0, H, BLOCK):
            j = j0 + cols
            m = j < H
            d0 = tl.zeros([BLOCK], tl.float32)
            d1 = tl.zeros([BLOCK], tl.float32)
            for q in range(0, Nz):
                z0 = tl.load(z_row + q)
                z1 = tl.load(z_row + n + q)
                w0 = tl.load(wd + ((0 * 4 + g) * Nz + q) * H + j, mask=m, other=0.0)
                w1 = tl.load(wd + ((1 * 4 + g) * Nz + q) * H + j, mask=m, other=0.0)
                d0 += z0 * w0
                d1 += z1 * w1
            dp = tl.load(dp_row + j, mask=m, other=0.0)
            tl.store(d_a + b * da_s + g * H + j, dp * d0, mask=m)
            tl.store(d_xw + b * dxw_s + g * H + j, dp * d1, mask=m)
        for q in range(0, Nz):
            s0 = tl.zeros([BLOCK], tl.float32)
            s1 = tl.zeros([BLOCK], tl.float32)
            s2 = tl.zeros([BLOCK], tl.float32)
            for j0 in range(0, H, BLOCK):
                j = j0 + cols
                m = j < H
                dp = tl.load(dp_row + j, mask=m, other=0.0)
                ar = tl.load(a_row + j, mask=m, other=0.0)
                xr = tl.load(x_row + j, mask=m, other=0.0)
                w0 = tl.load(wd + ((0 * 4 + g) * Nz + q) * H + j, mask=m, other=0.0)
                w1 = tl.load(wd + ((1 * 4 + g) * Nz + q) * H + j, mask=m, other=0.0)
                w2 = tl.load(wd + ((2 * 4 + g) * Nz + q) * H + j, mask=m, other=0.0)
                s0 += (dp * ar) * w0
                s1 += (dp * xr) * w1
                s2 += dp * w2
            dz_row = dz + b * dz_s + g * Nz + q
            tl.store(dz_row, tl.sum(s0, 0))
            tl.store(dz_row + n, tl.sum(s1, 0))
            tl.store(dz_row + 2 * n, tl.sum(s2, 0))

    @triton.jit
    def _hyper_bwd_weights_kernel(dpre, dpre_s, a, a_s, xw, xw_s, z, z_s, g_wd, g_bias, B, H, Nz,
                                  HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        # Per (gate g, block of units j): g_wd[k, g, q, j] += sum_b z[b, k, g, q] dd_k[b, j] and
        # g_bias[gH + j] += sum_b dpre[b, gH + j], the rows in tiles of ROWS.
        g = tl.program_id(0)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = j < H
        off = g * H + j
        n = 4 * Nz
        rows = tl.arange(0, ROWS)
        if HAS_BIAS:
            acc = tl.zeros([BLOCK], tl.float32)
            for b0 in range(0, B, ROWS):
                r = (b0 + rows).to(tl.int64)
                mm = (r < B)[:, None] & m[None, :]
                acc += tl.sum(tl.load(dpre + r[:, None] * dpre_s + off[None, :], mask=mm, other=0.0), 0)
            tl.store(g_bias + off, tl.load(g_bias + off, mask=m, other=0.0) + acc, mask=m)
        for q in range(0, Nz):
            e0 = tl.zeros([BLOCK], tl.float32)
            e1 = tl.zeros([BLOCK], tl.float32)
            e2 = tl.zeros([BLOCK], tl.float32)
            for b0 in range(0, B, ROWS):
                r = (b0 + rows).to(tl.int64)
                mr = r < B
                mm = mr[:, None] & m[None, :]
                dp = tl.load(dpre + r[:, None] * dpre_s + off[None, :], mask=mm, other=0.0)
                ar = tl.load(a + r[:, None] * a_s + off[None, :], mask=mm, other=0.0)
                xr = tl.load(xw + r[:, None] * xw_s + off[None, :], mask=mm, other=0.0)
                z0 = tl.load(z + r * z_s + g * Nz + q, mask=mr, other=0.0)
                z1 = tl.load(z + r * z_s + n + g * Nz + q, mask=mr, other=0.0)
                z2 = tl.load(z + r * z_s + 2 * n + g * Nz + q, mask=mr, other=0.0)
                e0 += tl.sum(z0[:, None] * (dp * ar), 0)
                e1 += tl.sum(z1[:, None] * (dp * xr), 0)
                e2 += tl.sum(z2[:, None] * dp, 0)
            p0 = g_wd + ((0 * 4 + g) * Nz + q) * H + j
            p1 = g_wd + ((1 * 4 + g) * Nz + q) * H + j
            p2 = g_wd + ((2 * 4 + g) * Nz + q) * H + j
            tl.store(p0, tl.load(p0, mask=m, other=0.0) + e0, mask=m)
            tl.store(p1, tl.load(p1, mask=m, other=0.0) + e1, mask=m)
            tl.store(p2, tl.load(p2, mask=m, other=0.0) + e2, mask=m)


def _rows(t: torch.Tensor) -> int:
    """Row stride of a (rows, units) tensor whose units are contiguous."""
    if t.dim() != 2 or (t.size(1) > 1 and t.stride(1) != 1):
        raise ValueError(f"expected rows of contiguous units, got shape {tuple(t.shape)} strides {t.stride()}")
    return t.stride(0)


class TritonKernels:
    """The step kernels of ``_fused._Kernels`` in Triton, for float32 tensors (CUDA; CPU under
    ``TRITON_INTERPRET=1``). One instance per fused call: it holds the scratch buffer of the
    layer-norm parameter gradients. ``cell_fwd``/``cell_bwd`` take the loop's ``_Saved`` buffers
    (``sv``) like ``_Kernels``; ``hyper_fwd``/``hyper_bwd`` take tensors where ``_Kernels``'s raw
    entry points take pointers and strides."""

    max_block = 512   # units per block in the cell kernels (larger S loops over blocks)
    hyper_block = 128  # units per block in the hyper kernels
    num_warps = 4

    def __init__(self, like: torch.Tensor):
        if like.dtype != torch.float32:
            raise TypeError(f"the Triton step kernels are float32 only, got {like.dtype}")
        self._part: dict = {}
        # Multiply-adds contract to FMAs, as in the C++ kernels (gcc's default); stated, not defaulted
        # (the default changes in triton 3.10).
        self._launch = dict(num_warps=self.num_warps, enable_fp_fusion=True)

    def _block(self, S: int) -> int:
        return max(16, min(_next_pow2(S), self.max_block))

    def cell_fwd(self, t, B, pre, add1, add2, sv, norms, eps, mask, h_out):
        """Step t on the first B rows (the active ones of a packed batch)."""
        if B == 0:
            return
        S = sv.c.size(-1)
        gw, gb, cw, cb = norms
        ln = sv.ln
        dummy = pre
        _cell_fwd_kernel[(B,)](
            pre, _rows(pre), dummy if add1 is None else add1, 0 if add1 is None else _rows(add1),
            dummy if add2 is None else add2, 0 if add2 is None else _rows(add2),
            dummy if gw is None else gw, dummy if gb is None else gb,
            dummy if cw is None else cw, dummy if cb is None else cb, float(eps),
            dummy if mask is None else mask[t], sv.c[t], sv.act[t], sv.c[t + 1], h_out, _rows(h_out),
            sv.gx[t] if ln else dummy, sv.grstd[t] if ln else dummy, sv.cmean[t] if ln else dummy,
            sv.crstd[t] if ln else dummy, sv.tc[t] if ln else dummy, S,
            ADD1=add1 is not None, ADD2=add2 is not None, LNG=gw is not None, LNC=cw is not None,
            MASK=mask is not None, BLOCK=self._block(S), **self._launch)

    def _scratch(self, rows: int, S: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._part.get(S)
        if buf is None or buf.size(0) < rows or buf.device != like.device:
            buf = self._part[S] = like.new_empty(rows, 10 * S)
        return buf

    def cell_bwd(self, t, B, dh, dh_add, dc, sv, norms, mask, dpre_out, grads):
        """Step t on the first B rows; dc is updated in place to dc_{t-1}; d(pre) goes into dpre_out;
        the layer-norm parameter gradients accumulate into ``grads``."""
        if B == 0:
            return
        S = sv.c.size(-1)
        gw, _, cw, _ = norms
        ln = sv.ln
        lng, lnc = gw is not None, cw is not None
        dummy = dh
        part = self._scratch(dh.size(0), S, dh) if (lng or lnc) else dummy
        block = self._block(S)
        _cell_bwd_kernel[(B,)](
            dh, dummy if dh_add is None else dh_add, dc, sv.act[t], sv.c[t], sv.c[t + 1],
            sv.tc[t] if ln else dummy, dummy if mask is None else mask[t], dummy if gw is None else gw,
            dummy if cw is None else cw, sv.gx[t] if ln else dummy, sv.grstd[t] if ln else dummy,
            sv.cmean[t] if ln else dummy, sv.crstd[t] if ln else dummy, dpre_out, _rows(dpre_out), dc,
            part, part.stride(0), S,
            ADD=dh_add is not None, LNG=lng, LNC=lnc, MASK=mask is not None, BLOCK=block,
            **self._launch)
        if lng or lnc:
            rb = self._block(4 * S if lng else S)
            grid = (triton.cdiv(4 * S if lng else S, rb),)
            _ln_grad_kernel[grid](
                part, part.stride(0), B, S, grads["gw"] if lng else dummy, grads["gb"] if lng else dummy,
                grads["cw"] if lnc else dummy, grads["cb"] if lnc else dummy, LNG=lng, LNC=lnc, BLOCK=rb,
                **self._launch)

    def hyper_fwd(self, B, H, Nz, a, xw, z, wd, bias, pre):
        """pre[:B] = d_b(z) + bias + a[:B, :4H] * d_h(z) + xw[:B] * d_x(z); ``wd`` (3, 4, Nz, H)
        contiguous (d_weight with its last two axes swapped), z (>= B, 3 * 4 * Nz)."""
        if B == 0:
            return
        blk = max(16, min(_next_pow2(H), self.hyper_block))
        _hyper_fwd_kernel[(B, 4, triton.cdiv(H, blk))](
            a, _rows(a), xw, _rows(xw), z, _rows(z), wd, bias, pre, _rows(pre), H, Nz, BLOCK=blk,
            **self._launch)

    def hyper_bwd(self, B, H, Nz, dpre, a, xw, z, wd, d_a, d_xw, dz, g_wd, g_bias):
        """Backward of ``hyper_fwd`` on the first B rows: writes d_a[:B, :4H], d_xw[:B], dz[:B];
        accumulates g_wd (3, 4, Nz, H) and g_bias (4H, may be None)."""
        if B == 0:
            return
        blk = max(16, min(_next_pow2(H), self.hyper_block))
        _hyper_bwd_rows_kernel[(B, 4)](
            dpre, _rows(dpre), a, _rows(a), xw, _rows(xw), z, _rows(z), wd, d_a, _rows(d_a), d_xw, _rows(d_xw),
            dz, _rows(dz), H, Nz, BLOCK=blk, **self._launch)
        _hyper_bwd_weights_kernel[(4, triton.cdiv(H, blk))](
            dpre, _rows(dpre), a, _rows(a), xw, _rows(xw), z, _rows(z), g_wd,
            dpre if g_bias is None else g_bias, B, H, Nz, HAS_BIAS=g_bias is not None, BLOCK=blk,
            ROWS=min(16, max(2, _next_pow2(B))), **self._launch)

"""The Triton step kernels (src/hypernetworks/nn/_triton_kernels.py), which the fused LSTM /
HyperLSTM paths use on CUDA, checked on CPU in Triton's interpreter (``TRITON_INTERPRET=1``).

Each kernel runs on small random float32 inputs and every output and saved tensor is compared
with the compiled C++ kernels (when this machine can build them) and with the PyTorch-op
implementation of ``_fused.py`` (always); the buffers' rows past the active B rows (packed
batches) must stay untouched, and strided inputs and outputs are used where the fused loops pass
them. End to end, HyperLSTM, LN HyperLSTM and LN LSTM sequences (one with recurrent dropout, one
packed) run forward and backward with the Triton kernels forced on for CPU tensors and must match
the default path.

The interpreter has to be switched on before the kernels are defined, and must not leak into the
rest of the test session (on a GPU machine the same process runs the kernels compiled), so the
checks run once in a child process (this file run as a script) and each case reports here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

# (name, B active rows, S units, layer norm, dropout mask, adds to pre, dh_add, buffer rows)
CELL_CASES = [
    ("B1-S5-plain", 1, 5, False, False, 0, False, 1),
    ("B3-S16-mask-add1-packed", 3, 16, False, True, 1, True, 4),
    ("B7-S33-ln-add2", 7, 33, True, False, 2, False, 7),
    ("B3-S33-ln-mask-add1-packed", 3, 33, True, True, 1, True, 5),
    ("B1-S16-ln-mask-add2-packed", 1, 16, True, True, 2, False, 3),
    ("B7-S5-ln-packed", 7, 5, True, False, 0, True, 8),
    ("B3-S5-mask-add2", 3, 5, False, True, 2, False, 3),
]
# (name, B active rows, H, N_z, bias, buffer rows)
HYPER_CASES = [
    ("B1-H5-Nz2", 1, 5, 2, True, 1),
    ("B3-H16-Nz3-packed-nobias", 3, 16, 3, False, 4),
    ("B7-H33-Nz2", 7, 33, 2, True, 7),
]
# (name, model, options)
E2E_CASES = [
    ("hyperlstm", "hyper", {}),
    ("ln-hyperlstm-dropout", "hyper", {"layer_norm": True, "recurrent_dropout": 0.25}),
    ("ln-hyperlstm-packed", "hyper", {"layer_norm": True, "packed": True}),
    ("ln-lstm", "lstm", {"layer_norm": True}),
    ("ln-lstm-packed-dropout", "lstm", {"layer_norm": True, "recurrent_dropout": 0.25, "packed": True}),
]
CASES = ([f"cell-{c[0]}" for c in CELL_CASES] + [f"hyper-{c[0]}" for c in HYPER_CASES]
         + [f"e2e-{c[0]}" for c in E2E_CASES])

TOL = dict(rtol=1e-5, atol=1e-5)
SENTINEL = 7.25  # rows past the active ones must keep this value


# -- end to end: a layer's forward and backward with the Triton kernels against the default path ----
def _compare_paths(kind, opts, device, switch, size, close):
    """Runs a HyperLSTM or LSTM (``opts``: its options, plus ``packed``) forward and backward twice,
    ``switch(True)`` (the Triton kernels) and ``switch(False)`` (the default path), with the same
    dropout masks, and compares outputs, final states and every gradient with ``close``."""
    import torch
    from torch.nn.utils.rnn import pack_sequence

    from hypernetworks.nn import LSTM, HyperLSTM
    from hypernetworks.nn import _triton_kernels as tk

    opts = dict(opts)
    packed = opts.pop("packed", False)
    torch.manual_seed(3)
    I, H, T, B = size["I"], size["H"], size["T"], size["B"]
    if kind == "hyper":
        m = HyperLSTM(I, H, hyper_size=size["HH"], embedding_size=size["NZ"], **opts)
    else:
        m = LSTM(I, H, **opts)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m = m.to(device).train(True)
    if packed:
        seqs = [torch.randn(max(1, T - k % 3), I, device=device) for k in range(B)]
    else:
        x0 = torch.randn(T, B, I, device=device)
    calls = {"n": 0}
    real_init = tk.TritonKernels.__init__

    def counting_init(self, like):
        calls["n"] += 1
        real_init(self, like)

    def run(triton_on: bool):
        switch(triton_on)
        tk.TritonKernels.__init__ = counting_init
        try:
            m.zero_grad(set_to_none=True)
            torch.manual_seed(11)  # the same dropout masks on both runs
            if packed:
                xs = [x.clone().requires_grad_() for x in seqs]
                out, state = m(pack_sequence(xs, enforce_sorted=False))
                y = out.data
            else:
                xs = [x0.clone().requires_grad_()]
                y, state = m(xs[0])
            w = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
            loss = (y * w).sum() + sum((k + 1) * s.pow(2).sum() for k, s in enumerate(state))
            loss.backward()
            return [y, *state], [x.grad for x in xs] + [p.grad for p in m.parameters()]
        finally:
            switch(False)
            tk.TritonKernels.__init__ = real_init

    outs_t, grads_t = run(True)
    n_triton = calls["n"]
    assert n_triton > 0, "the Triton kernels were not used"
    outs_d, grads_d = run(False)
    assert calls["n"] == n_triton, "the default path used the Triton kernels"
    for i, (x, y) in enumerate(zip(outs_t, outs_d)):
        close(f"output {i}", x, y)
    for i, (x, y) in enumerate(zip(grads_t, grads_d)):
        close(f"gradient {i}", x, y, dict(rtol=1e-4, atol=1e-5))


# -- the child process: runs every check in the interpreter --------------------------------------
def _child() -> dict:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    torch.set_num_threads(1)
    from hypernetworks.nn import _fused, _kernels
    from hypernetworks.nn import _triton_kernels as tk

    if not tk.available():
        return {"__skip__": tk.why_unavailable()}
    lib = _kernels.library()
    results = {}

    def close(name, got, want, tol=TOL):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")

    def untouched(name, t, rows_from):
        rest = t[rows_from:]
        assert bool((rest == SENTINEL).all()), f"{name}: rows from {rows_from} on were written"

    def saved(T, rows, S, ln):
        sv = _fused._Saved(T, rows, S, torch.zeros(1), ln)
        for x in sv.tensors():
            x.fill_(SENTINEL)
        return sv

    def triton_k():
        k = tk.TritonKernels(torch.zeros(1))
        k.max_block = 16  # S = 33 loops over three blocks, S = 16 fills one, S = 5 part of one
        k.hyper_block = 16
        return k

    def cell_case(B, S, ln, use_mask, adds, use_dh_add, rows):
        g = torch.Generator().manual_seed(B * 100 + S)
        rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        T, t, eps = 2, 1, 1e-5
        G = 4 * S
        wide = rnd(rows, G + 3 * S)             # pre as a strided view, as a[:, 4H:] in the hyper loop
        pre = wide[:, 2 * S:2 * S + G]
        add = [rnd(rows, G + S)[:, :G] for _ in range(adds)]
        add1, add2 = (add + [None, None])[:2]
        norms = (1 + 0.3 * rnd(4, S), 0.3 * rnd(4, S), 1 + 0.3 * rnd(S), 0.3 * rnd(S)) if ln else (None,) * 4
        mask = (torch.rand(T, rows, S, generator=g) > 0.3).float() / 0.7 if use_mask else None
        c_t = rnd(rows, S)
        # The three implementations, each on its own buffers.
        svs = {name: saved(T, rows, S, ln) for name in ("triton", "cpp", "torch")}
        for sv in svs.values():
            sv.c[t] = c_t
        h_wide = {name: torch.full((rows, S + 2), SENTINEL) for name in svs}
        h = {name: hw[:, 1:S + 1] for name, hw in h_wide.items()}  # strided h rows
        k = triton_k()
        k.cell_fwd(t, B, pre, add1, add2, svs["triton"], norms, eps, mask, h["triton"])
        if lib is not None:
            _fused._Kernels(lib, pre).cell_fwd(t, B, pre, add1, add2, svs["cpp"], norms, eps, mask, h["cpp"])
        p_sum = pre[:B] + (add1[:B] if add1 is not None else 0) + (add2[:B] if add2 is not None else 0)
        ref = _fused._Saved(T, B, S, pre, ln)
        ref.c[t] = c_t[:B]
        h_ref = _fused._update_forward(t, p_sum.contiguous(), ref, norms, None if mask is None else mask[t, :B],
                                       eps)
        sv = svs["triton"]
        got = {"act": sv.act[t], "c_next": sv.c[t + 1], "h": h["triton"]}
        want = {"act": ref.act[t], "c_next": ref.c[t + 1], "h": h_ref}
        if ln:
            got.update(gx=sv.gx[t], grstd=sv.grstd[t], cmean=sv.cmean[t], crstd=sv.crstd[t], tc=sv.tc[t])
            want.update(gx=ref.gx[t], grstd=ref.grstd[t], cmean=ref.cmean[t], crstd=ref.crstd[t], tc=ref.tc[t])
        for name, x in got.items():
            close(f"forward {name} vs PyTorch ops", x[:B], want[name])
            untouched(f"forward {name}", x, B)
            if lib is not None:
                cpp = {"act": svs["cpp"].act[t], "c_next": svs["cpp"].c[t + 1], "h": h["cpp"]}
                if ln:
                    cs = svs["cpp"]
                    cpp.update(gx=cs.gx[t], grstd=cs.grstd[t], cmean=cs.cmean[t], crstd=cs.crstd[t], tc=cs.tc[t])
                close(f"forward {name} vs C++", x[:B], cpp[name][:B])
        assert bool((h_wide["triton"][:, 0] == SENTINEL).all() and (h_wide["triton"][:, -1] == SENTINEL).all())
        # Backward of the same step, from each implementation's own forward buffers.
        dh, dc0 = rnd(rows, S), rnd(rows, S)
        dh_add = rnd(rows, S) if use_dh_add else None
        grads0 = {k_: 0.1 * rnd(*v.shape) for k_, v in _fused._ln_grads(norms, S).items()}  # accumulated into
        out = {}
        for name in ("triton", "cpp"):
            if name == "cpp" and lib is None:
                continue
            dc = dc0.clone()
            dpre_wide = torch.full((rows, G + 2 * S), SENTINEL)
            dpre = dpre_wide[:, S:S + G]  # strided rows, as d_a[t, :, 4H:] in the hyper loop
            grads = {k_: v.clone() for k_, v in grads0.items()}
            kk = k if name == "triton" else _fused._Kernels(lib, pre)
            kk.cell_bwd(t, B, dh, dh_add, dc, svs[name], norms, mask, dpre, grads)
            out[name] = (dpre, dc, grads, dpre_wide)
        grads_ref = {k_: v.clone() for k_, v in grads0.items()}
        dpre_ref = torch.empty(B, G)
        dh_sum = dh[:B] + (dh_add[:B] if dh_add is not None else 0)
        dc_ref = _fused._update_backward(t, dh_sum, dc0[:B], ref, norms, None if mask is None else mask[t, :B], eps,
                                         grads_ref, dpre_ref)
        dpre, dc, grads, dpre_wide = out["triton"]
        close("backward d(pre) vs PyTorch ops", dpre[:B], dpre_ref)
        close("backward dc_prev vs PyTorch ops", dc[:B], dc_ref)
        close("backward dc rows past B", dc[B:], dc0[B:], dict(rtol=0, atol=0))
        untouched("backward d(pre)", dpre, B)
        assert bool((dpre_wide[:, :S] == SENTINEL).all() and (dpre_wide[:, S + G:] == SENTINEL).all())
        for name in grads:
            close(f"backward layer-norm gradient {name} vs PyTorch ops", grads[name], grads_ref[name])
        if "cpp" in out:
            cd, cc, cg, _ = out["cpp"]
            close("backward d(pre) vs C++", dpre[:B], cd[:B])
            close("backward dc_prev vs C++", dc, cc)
            for name in grads:
                close(f"backward layer-norm gradient {name} vs C++", grads[name], cg[name])

    def hyper_case(B, H, Nz, has_bias, rows):
        g = torch.Generator().manual_seed(B * 1000 + H * 10 + Nz)
        rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        Hh = 3
        G, n = 4 * H, 4 * Nz
        a = rnd(rows, G + 4 * Hh)          # h_{t-1} @ [W_h; W_hat_h]^T: the first 4H columns are used
        xw = rnd(rows, G)
        z = rnd(rows, 3 * n)
        d_weight = rnd(3, 4, H, Nz)
        wd = d_weight.transpose(-1, -2).contiguous()
        bias = rnd(G)
        k = triton_k()
        pre = torch.full((rows, G), SENTINEL)
        k.hyper_fwd(B, H, Nz, a, xw, z, wd, bias, pre)

        def reference(a_, xw_, z_, dw_, bias_):
            zz = z_.view(-1, 3, 4, Nz)
            d = torch.einsum("bkgq,kghq->bkgh", zz, dw_).reshape(-1, 3, G)
            return d[:, 2] + bias_ + a_ * d[:, 0] + xw_ * d[:, 1]

        leaves = [x.clone().requires_grad_() for x in (a[:B, :G], xw[:B], z[:B], d_weight, bias)]
        want = reference(*leaves)
        close("hyper forward vs PyTorch ops", pre[:B], want.detach())
        untouched("hyper forward", pre, B)
        if lib is not None:
            pc = torch.full((rows, G), SENTINEL)
            _fused._Kernels(lib, a).hyper_fwd(B, H, Nz, a, xw, z, wd, bias, pc)
            close("hyper forward vs C++", pre[:B], pc[:B])
        dpre = rnd(rows, G)
        gw0, gb0 = 0.1 * rnd(*wd.shape), 0.1 * rnd(G)
        out = {}
        for name in ("triton", "cpp"):
            if name == "cpp" and lib is None:
                continue
            d_a = torch.full((rows, G + 4 * Hh), SENTINEL)
            d_xw = torch.full((rows, G), SENTINEL)
            dz = torch.full((rows, 3 * n), SENTINEL)
            g_wd, g_bias = gw0.clone(), gb0.clone() if has_bias else None
            kk = k if name == "triton" else _fused._Kernels(lib, a)
            kk.hyper_bwd(B, H, Nz, dpre, a, xw, z, wd, d_a, d_xw, dz, g_wd, g_bias)
            out[name] = (d_a, d_xw, dz, g_wd, g_bias)
        want_g = torch.autograd.grad(want, leaves, dpre[:B])
        d_a, d_xw, dz, g_wd, g_bias = out["triton"]
        close("hyper backward d(a) vs autograd", d_a[:B, :G], want_g[0])
        close("hyper backward d(xw) vs autograd", d_xw[:B], want_g[1])
        close("hyper backward dz vs autograd", dz[:B], want_g[2])
        close("hyper backward d_weight gradient vs autograd", g_wd, gw0 + want_g[3].transpose(-1, -2))
        if has_bias:
            close("hyper backward bias gradient vs autograd", g_bias, gb0 + want_g[4])
        assert bool((d_a[:, G:] == SENTINEL).all()), "hyper backward wrote d(a) past the 4H columns"
        for name, x in (("d(a)", d_a), ("d(xw)", d_xw), ("dz", dz)):
            untouched(f"hyper backward {name}", x, B)
        if "cpp" in out:
            for name, x, y in zip(("d(a)", "d(xw)", "dz", "g_wd", "g_bias"), out["triton"], out["cpp"]):
                if x is not None:
                    close(f"hyper backward {name} vs C++", x, y)

    def e2e_case(kind, opts):
        def switch(on: bool):
            _fused._TRITON_ON_CPU = on

        _compare_paths(kind, opts, "cpu", switch, dict(I=3, H=6, HH=5, NZ=2, T=4, B=3), close)

    checks = ([(f"cell-{c[0]}", cell_case, c[1:]) for c in CELL_CASES]
              + [(f"hyper-{c[0]}", hyper_case, c[1:]) for c in HYPER_CASES]
              + [(f"e2e-{c[0]}", e2e_case, c[1:]) for c in E2E_CASES])
    seconds = {}
    for name, fn, args in checks:
        t0 = time.perf_counter()
        try:
            fn(*args)
            results[name] = None
        except Exception:  # reported per case in the parent
            results[name] = traceback.format_exc()[-3000:]
        seconds[name] = round(time.perf_counter() - t0, 2)
    results["__cpp__"] = lib is not None
    results["__seconds__"] = seconds
    return results


# -- the tests -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreter_results():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed, so the Triton step kernels (the CUDA fast path) cannot be "
                    "checked in its CPU interpreter; `pip install triton` (Linux x86_64) to run these tests")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HYPERNETWORKS_TRITON": "1", "OMP_NUM_THREADS": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, env=env,
                          timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"the interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(lines[-1][len("RESULTS "):])
    if "__skip__" in results:
        pytest.skip(f"the Triton step kernels are unavailable here: {results['__skip__']}")
    return results


@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_matches_reference_in_interpreter(interpreter_results, case):
    err = interpreter_results[case]
    assert err is None, f"{case}:\n{err}"


def test_kernels_for_takes_triton_only_for_cuda_float32_or_the_test_switch(monkeypatch):
    """Which kernels ``_kernels_for`` picks (no kernel runs): CPU stays on the C++ kernels unless
    the test switch is on; HYPERNETWORKS_TRITON=0 turns Triton off."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed; nothing to select")
    import torch

    from hypernetworks.nn import _fused, _kernels
    from hypernetworks.nn import _triton_kernels as tk

    if not tk.available():
        pytest.skip(f"the Triton step kernels are unavailable here: {tk.why_unavailable()}")
    x = torch.zeros(2, 3)
    assert _fused._kernels_for(x) is _kernels.library()
    monkeypatch.setattr(_fused, "_TRITON_ON_CPU", True)
    assert _fused._kernels_for(x) is tk.TritonKernels
    assert _fused._kernels_for(x.double()) is _kernels.library()  # float32 only
    monkeypatch.setenv("HYPERNETWORKS_TRITON", "0")
    assert _fused._kernels_for(x) is _kernels.library()


def test_triton_kernels_compile_for_a_gpu_without_one():
    """Code generation the interpreter skips: each kernel, with all its options on and all off,
    compiled for sm_90 (H100/H200) down to a cubin with the ptxas that ships with triton; no GPU
    is needed. Catches what only the compiler rejects (types of loop-carried values, constexpr
    branches, int widths)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed; no kernels to compile")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process, so the kernels are interpreted, not compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hypernetworks.nn import _triton_kernels as tk

    if not tk.available():
        pytest.skip(f"the Triton step kernels are unavailable here: {tk.why_unavailable()}")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton build has no NVIDIA backend to compile for")
    ints = {"pre_s", "add1_s", "add2_s", "h_s", "S", "dpre_s", "part_s", "B", "a_s", "xw_s", "z_s", "H", "Nz",
            "da_s", "dxw_s", "dz_s"}
    on, off = True, False
    jobs = [(tk._cell_fwd_kernel, dict(ADD1=v, ADD2=v, LNG=v, LNC=v, MASK=v, BLOCK=512)) for v in (on, off)]
    jobs += [(tk._cell_bwd_kernel, dict(ADD=v, LNG=v, LNC=v, MASK=v, BLOCK=512)) for v in (on, off)]
    jobs += [(tk._ln_grad_kernel, dict(LNG=on, LNC=on, BLOCK=512)), (tk._hyper_fwd_kernel, dict(BLOCK=128)),
             (tk._hyper_bwd_rows_kernel, dict(BLOCK=128)),
             (tk._hyper_bwd_weights_kernel, dict(HAS_BIAS=on, BLOCK=128, ROWS=16))]
    for fn, const in jobs:
        sig = {name: "constexpr" if name in const else "fp32" if name == "eps" else "i32" if name in ints
               else "*fp32" for name in fn.arg_names}
        try:
            src = ASTSource(fn, sig, constexprs=const)
        except TypeError as e:  # the signature format used here is that of recent triton (3.9 checked)
            pytest.skip(f"triton {triton.__version__} takes another ASTSource signature ({e})")
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": tk.TritonKernels.num_warps, "enable_fp_fusion": True})
        assert k.asm.get("cubin"), f"{fn.__name__} {const}: no cubin"


@pytest.mark.parametrize("case", [c[0] for c in E2E_CASES])
def test_triton_kernels_on_cuda_match_the_pytorch_op_path(case, monkeypatch):
    """On a GPU: each layer of the end-to-end cases, at a size where the cell kernels loop over
    two blocks of units, with the Triton kernels (the default on CUDA in float32) against the
    PyTorch-op path (HYPERNETWORKS_TRITON=0)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: runs the compiled Triton kernels on the device (their numerics are "
                    "checked on CPU by the interpreter tests above)")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: CUDA runs the PyTorch-op path only")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set in this process, so the kernels would be interpreted")
    from hypernetworks.nn import _triton_kernels as tk

    if not tk.available():
        pytest.skip(f"the Triton step kernels are unavailable here: {tk.why_unavailable()}")
    kind, opts = next((c[1], c[2]) for c in E2E_CASES if c[0] == case)

    def switch(on: bool):
        monkeypatch.setenv("HYPERNETWORKS_TRITON", "1" if on else "0")

    def close(name, got, want, tol=TOL):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{case} {name}: {m}")

    _compare_paths(kind, opts, "cuda", switch, dict(I=7, H=600, HH=130, NZ=4, T=5, B=9), close)


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    print("RESULTS " + json.dumps(_child()), flush=True)

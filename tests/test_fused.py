"""The fused whole-sequence paths (src/hypernetworks/nn/_fused.py) against the eager per-step path."""
from __future__ import annotations

import itertools

import pytest
import torch

from hypernetworks.nn import LSTM, HyperLSTM
from hypernetworks.nn import _fused, _kernels

I, H, HH, NZ, T, B = 3, 5, 4, 2, 4, 2


# every test runs on both fused step paths (the step_path fixture of conftest.py)
pytestmark = pytest.mark.usefixtures("step_path")


def make(kind: str, **kw) -> torch.nn.Module:
    if kind == "hyper":
        m = HyperLSTM(I, H, hyper_size=HH, embedding_size=NZ, **kw)
    else:
        m = LSTM(I, H, **kw)
    m = m.double()
    with torch.no_grad():  # move away from the special initial values (d = 0.1, zero dynamic bias)
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def set_fused(m: torch.nn.Module, on: bool) -> None:
    for cell in m.cells:
        cell.fused = on


def run(m, x, hx, fused: bool):
    """Output, final state and all gradients of a loss touching every output and state."""
    set_fused(m, fused)
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    hx = None if hx is None else tuple(h.clone().requires_grad_() for h in hx)
    out, state = m(x, hx)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * weights).sum() + sum((k + 1) * s.pow(2).sum() for k, s in enumerate(state))
    loss.backward()
    grads = [x.grad] + ([h.grad for h in hx] if hx is not None else [])
    grads += [p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]
    return out, state, grads


def assert_same(a, b, tol=1e-10):
    out_a, state_a, grads_a = a
    out_b, state_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, rtol=tol, atol=tol)
    for s, t in zip(state_a, state_b, strict=True):
        torch.testing.assert_close(s, t, rtol=tol, atol=tol)
    for g, h in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(g, h, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind,layer_norm,bias", list(itertools.product(["hyper", "lstm"], [False, True], [True, False])))
def test_fused_equals_eager(kind, layer_norm, bias):
    torch.manual_seed(0)
    m = make(kind, num_layers=2, bias=bias, layer_norm=layer_norm)
    x = torch.randn(T, B, I, dtype=torch.double)
    hx = tuple(torch.randn(2, B, n, dtype=torch.double) for n in m.cells[0].state_sizes)
    for state in (None, hx):
        assert_same(run(m, x, state, fused=False), run(m, x, state, fused=True))


@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_fused_equals_eager_batch_first_and_unbatched(kind):
    torch.manual_seed(1)
    m = make(kind, batch_first=True, layer_norm=True)
    x = torch.randn(B, T, I, dtype=torch.double)
    assert_same(run(m, x, None, fused=False), run(m, x, None, fused=True))
    x1 = torch.randn(T, I, dtype=torch.double)
    assert_same(run(m, x1, None, fused=False), run(m, x1, None, fused=True))


def test_fused_path_is_taken_and_can_be_switched_off(monkeypatch):
    m = make("hyper")
    x = torch.randn(T, B, I, dtype=torch.double)
    assert type(m(x)[0].grad_fn).__name__ == "_HyperLSTMFunctionBackward"
    ln = make("lstm", layer_norm=True)
    assert type(ln(x)[0].grad_fn).__name__ == "_LSTMFunctionBackward"
    assert "_HyperLSTMFunction" not in type(m(x[:1])[0].grad_fn).__name__  # single steps stay eager
    monkeypatch.setenv(_fused.ENV_VAR, "0")
    assert "_HyperLSTMFunction" not in type(m(x)[0].grad_fn).__name__
    monkeypatch.delenv(_fused.ENV_VAR)
    set_fused(m, False)
    assert "_HyperLSTMFunction" not in type(m(x)[0].grad_fn).__name__


def test_carried_state_equals_one_call():
    torch.manual_seed(2)
    m = make("hyper", layer_norm=True)
    x = torch.randn(2 * T, B, I, dtype=torch.double)
    whole, state_whole = m(x)
    first, state = m(x[:T])
    second, state2 = m(x[T:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)
    for a, b in zip(state2, state_whole, strict=True):
        torch.testing.assert_close(a, b)


def _hyper_inputs(layer_norm: bool, bias: bool, dropout: bool):
    torch.manual_seed(3)
    m = make("hyper", layer_norm=layer_norm, bias=bias)
    cell = m.cells[0]
    x = torch.randn(T, B, I, dtype=torch.double)
    xw = torch.nn.functional.linear(x, cell.weight_ih).detach()
    xw_hat = torch.nn.functional.linear(x, cell.hyper.weight_ih[:, H:], cell.hyper.bias).detach()
    state = [torch.randn(B, n, dtype=torch.double) for n in cell.state_sizes]
    hyper, sc = cell.hyper, cell.scaling
    w_cat = torch.cat([cell.weight_hh, hyper.weight_ih[:, :H]]).detach()
    params = [w_cat, hyper.weight_hh, sc.z_weight, sc.z_bias, sc.d_weight, sc.bias,
              *_fused._norm_params(cell), *_fused._norm_params(hyper)]
    params = [None if p is None else p.detach().clone() for p in params]
    masks = [None, None]
    if dropout:
        masks = [(torch.rand(T, B, n, dtype=torch.double) > 0.3).double() / 0.7 for n in (H, HH)]
    tensors = [xw, xw_hat, *state, *params]
    grad_idx = [k for k, t in enumerate(tensors) if t is not None]
    return tensors, grad_idx, masks


@pytest.mark.parametrize("layer_norm,bias,dropout", [(False, True, False), (True, True, True), (False, False, True)])
def test_gradcheck_hyper_function(layer_norm, bias, dropout):
    tensors, grad_idx, masks = _hyper_inputs(layer_norm, bias, dropout)
    inputs = [t.requires_grad_() if t is not None else None for t in tensors]

    def f(*args):
        full = list(inputs)
        for k, a in zip(grad_idx, args, strict=True):
            full[k] = a
        return _fused._HyperLSTMFunction.apply(*full, *masks, 1e-5, 1e-5)

    assert torch.autograd.gradcheck(f, [inputs[k] for k in grad_idx], eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("layer_norm,dropout", [(True, False), (False, True), (True, True)])
def test_gradcheck_lstm_function(layer_norm, dropout):
    torch.manual_seed(4)
    m = make("lstm", layer_norm=layer_norm)
    cell = m.cells[0]
    xw = torch.randn(T, B, 4 * H, dtype=torch.double)
    h0, c0 = (torch.randn(B, H, dtype=torch.double) for _ in range(2))
    norms = [None if p is None else p.detach().clone() for p in _fused._norm_params(cell)]
    mask = (torch.rand(T, B, H, dtype=torch.double) > 0.3).double() / 0.7 if dropout else None
    tensors = [xw, h0, c0, cell.weight_hh.detach().clone(), *norms]
    idx = [k for k, t in enumerate(tensors) if t is not None]

    def f(*args):
        full = list(tensors)
        for k, a in zip(idx, args, strict=True):
            full[k] = a
        return _fused._LSTMFunction.apply(*full, mask, 1e-5)

    assert torch.autograd.gradcheck(f, [tensors[k].requires_grad_() for k in idx], eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("kind,layer_norm", [("hyper", False), ("hyper", True), ("lstm", False), ("lstm", True)])
def test_recurrent_dropout_fused_matches_eager_and_is_seeded(kind, layer_norm):
    m = make(kind, num_layers=2, layer_norm=layer_norm, recurrent_dropout=0.4, dropout=0.2)
    x = torch.randn(T, B, I, dtype=torch.double)
    results = []
    for fused in (False, True, True):
        torch.manual_seed(5)
        results.append(run(m, x, None, fused))
    assert_same(results[1], results[2], tol=0)                # deterministic under a seed
    assert_same(results[0], results[1])                       # same random stream as the eager path
    torch.manual_seed(6)
    other = run(m, x, None, True)
    assert not torch.allclose(other[0], results[1][0])        # the masks really are random
    m.eval()
    set_fused(m, True)
    out_eval, _ = m(x)
    ref = make(kind, num_layers=2, layer_norm=layer_norm)
    ref.load_state_dict(m.state_dict())
    ref.eval()
    torch.testing.assert_close(out_eval, ref(x)[0], rtol=0, atol=0)  # no dropout in eval


@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_float32_fast_products_match_eager(kind):
    """The oneDNN float32 products agree with the eager float32 path to float32 rounding."""
    torch.manual_seed(7)
    m = make(kind, layer_norm=False).float()
    x = torch.randn(T, B, I)
    a, b = run(m, x, None, False), run(m, x, None, True)
    assert_same(a, b, tol=1e-4)


# -- compiled kernels: sizes that exercise vector remainders and unit blocks ----------------------
@pytest.mark.parametrize("kind,layer_norm", [("hyper", False), ("hyper", True), ("lstm", True)])
def test_float32_wider_layers_match_eager(kind, layer_norm):
    """float32 (the kernels' own exp/tanh) at widths past one vector and one 128-unit block."""
    torch.manual_seed(8)
    kw = dict(hyper_size=19, embedding_size=3) if kind == "hyper" else {}
    m = (HyperLSTM if kind == "hyper" else LSTM)(6, 150, layer_norm=layer_norm, recurrent_dropout=0.2, **kw)
    x = torch.randn(5, 3, 6)

    def errors(fused):  # float32 run against the float64 eager reference, relative to each tensor's scale
        torch.manual_seed(9)
        out, state, grads = run(m.float(), x, None, fused)
        ref = reference
        pairs = [(out, ref[0]), *zip(state, ref[1]), *zip(grads, ref[2])]
        return max(((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in pairs)

    torch.manual_seed(9)
    reference = run(m.double(), x.double(), None, False)
    eager, fused = errors(False), errors(True)
    assert fused < 1e-5 and fused < 5 * eager + 1e-6, (fused, eager)  # as accurate as eager float32


# -- PackedSequence on the fused path -----------------------------------------------------------
def _packed(lengths, dtype=torch.double):
    seqs = [torch.randn(n, I, dtype=dtype) for n in lengths]
    return torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)


def run_packed(m, packed, fused: bool):
    set_fused(m, fused)
    m.zero_grad(set_to_none=True)
    data = packed.data.clone().requires_grad_()
    inp = torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    out, state = m(inp)
    weights = torch.linspace(-1, 1, out.data.numel(), dtype=out.data.dtype).view_as(out.data)
    loss = (out.data * weights).sum() + sum((k + 1) * s.pow(2).sum() for k, s in enumerate(state))
    loss.backward()
    grads = [data.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]
    return out.data, state, grads


@pytest.mark.parametrize("kind,layer_norm,dropout", [("hyper", False, False), ("hyper", True, True),
                                                     ("lstm", False, False), ("lstm", True, True)])
def test_packed_sequence_fused_equals_eager(kind, layer_norm, dropout, step_path, monkeypatch):
    """Variable lengths (unsorted, one of length 1) through 2 layers, training mode with recurrent
    and inter-layer dropout: the fused run with per-step active batch sizes matches the eager loop."""
    calls = []
    real = _fused.packed_forward
    monkeypatch.setattr(_fused, "packed_forward", lambda *a: calls.append(real(*a)) or calls[-1])
    rd = dict(recurrent_dropout=0.3, dropout=0.2) if dropout else {}
    torch.manual_seed(10)
    m = make(kind, num_layers=2, layer_norm=layer_norm, **rd)
    packed = _packed([3, 5, 1, 5, 2])
    results = []
    for fused in (False, True):
        torch.manual_seed(11)
        results.append(run_packed(m, packed, fused))
    assert_same(*results)
    taken = [c is not None for c in calls[-2:]]  # the fused run's two layers
    assert taken == [True, True]  # both paths: kernels skip finished rows, torch ops make them inert


def test_gradcheck_packed_hyper_function():
    """gradcheck of the HyperLSTM Function with per-step batch sizes (layer norm, dropout masks),
    on both paths; the final states are those of each row's last step."""
    tensors, grad_idx, masks = _hyper_inputs(layer_norm=True, bias=True, dropout=True)
    inputs = [t.requires_grad_() if t is not None else None for t in tensors]

    def f(*args):
        full = list(inputs)
        for k, a in zip(grad_idx, args, strict=True):
            full[k] = a
        return _fused._HyperLSTMFunction.apply(*full, *masks, 1e-5, 1e-5, [2, 2, 1, 1])

    assert torch.autograd.gradcheck(f, [inputs[k] for k in grad_idx], eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradcheck_packed_lstm_function():
    """gradcheck of the LSTM Function (layer norm, dropout mask) with per-step batch sizes."""
    torch.manual_seed(5)
    cell = make("lstm", layer_norm=True).cells[0]
    xw = torch.randn(T, B, 4 * H, dtype=torch.double)
    h0, c0 = (torch.randn(B, H, dtype=torch.double) for _ in range(2))
    norms = [p.detach().clone() for p in _fused._norm_params(cell)]
    mask = (torch.rand(T, B, H, dtype=torch.double) > 0.3).double() / 0.7
    tensors = [xw, h0, c0, cell.weight_hh.detach().clone(), *norms]
    sizes = [B] * (T - 2) + [1, 1]

    def f(*args):
        return _fused._LSTMFunction.apply(*args, mask, 1e-5, sizes)

    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in tensors], eps=1e-6, atol=1e-6, fast_mode=True)


# -- one step at a time without autograd (sampling) ------------------------------------------------
@pytest.mark.parametrize("kind,layer_norm", [("hyper", False), ("hyper", True), ("lstm", False), ("lstm", True)])
def test_single_steps_without_grad_use_fused_path_and_track_weight_updates(kind, layer_norm, monkeypatch):
    m = make(kind, num_layers=2, layer_norm=layer_norm).eval()
    x = torch.randn(6, B, I, dtype=torch.double)

    def generate(fused):
        set_fused(m, fused)
        outs, state = [], None
        with torch.no_grad():
            for t in range(x.size(0)):
                out, state = m(x[t:t + 1], state)
                outs.append(out)
        return torch.cat(outs), state

    built = []
    real = _fused._prepared
    monkeypatch.setattr(_fused, "_prepared", lambda cell, name, params, build: real(
        cell, name, params, lambda: built.append(name) or build()))
    eager, fused = generate(False), generate(True)
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-12, atol=1e-12)
    # prepared once per layer, not per step (the LN LSTM uses its weights as they are)
    assert len(built) == (0 if kind == "lstm" and layer_norm else 2)
    with torch.no_grad():  # an optimizer step changes the weights in place: the cache must follow
        for p in m.parameters():
            p.mul_(0.9)
    torch.testing.assert_close(generate(True)[0], generate(False)[0], rtol=1e-12, atol=1e-12)


# -- the compiled sequence loops -------------------------------------------------------------------
@pytest.mark.parametrize("kind,layer_norm,dropout,packed,layers,bidirectional", [
    ("hyper", False, False, False, 1, False), ("hyper", True, True, False, 2, True), ("hyper", False, True, True, 1, False),
    ("hyper", True, False, True, 2, True), ("lstm", True, False, False, 2, True), ("lstm", False, True, True, 1, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sequence_loops_run_and_equal_the_python_step_loop(kind, layer_norm, dropout, packed, layers, bidirectional,
                                                          dtype, step_path, monkeypatch):
    """The whole-sequence loops in the compiled library (per-step products in torch's MKL, packed
    GEMM for full float32 batches, plain GEMM for the shrinking batches of a PackedSequence) give
    the outputs, final states and every gradient of the Python loop over the same kernels."""
    if step_path != "loops":
        pytest.skip("compares the loops with the step loop, so it runs once, in the loops variant")
    calls = []
    real = _fused._loop_fn
    monkeypatch.setattr(_fused, "_loop_fn", lambda lib, name, like: calls.append(name) or real(lib, name, like))
    kw = dict(hyper_size=6, embedding_size=3) if kind == "hyper" else {}
    cls = HyperLSTM if kind == "hyper" else LSTM
    torch.manual_seed(3)
    m = cls(I, 9, num_layers=layers, bidirectional=bidirectional, layer_norm=layer_norm,
            recurrent_dropout=0.25 if dropout else 0.0, **kw).to(dtype)
    x = torch.randn(7, 4, I, dtype=dtype)

    def result(loops: bool):
        monkeypatch.setitem(_kernels._state, "loops", loops)
        m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same dropout masks
        if packed:
            seq = torch.nn.utils.rnn.pack_padded_sequence(xx, [7, 6, 3, 1])
            out, state = m(seq)
            out = out.data
        else:
            out, state = m(xx)
        ((out * out).sum() + sum((s * s).sum() for s in state)).backward()
        return [out.detach(), *(s.detach() for s in state), xx.grad] + [p.grad for p in m.parameters()]

    with_loops = result(True)
    assert {"hyper_seq_fwd" if kind == "hyper" else "lstm_seq_fwd",
            "hyper_seq_bwd" if kind == "hyper" else "lstm_seq_bwd"} <= set(calls)
    n = len(calls)
    step_loop = result(False)
    assert len(calls) == n  # the loops are off
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip(with_loops, step_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("embedding_size,hidden", [(1, 21), (2, 19), (3, 16), (4, 37), (5, 37), (6, 8), (7, 33),
                                                   (8, 16), (9, 21), (17, 5)])
def test_any_embedding_size_and_width_equals_eager(embedding_size, hidden, dtype, step_path):
    """The kernels' register-blocked forms (N_z 1 to 8 at compile time, units in 64-byte blocks plus
    a scalar tail, the gradients of z summed across lanes by a transpose tree: one or more groups of
    8 (float64) or 16 (float32) sums) and the generic one (N_z > 8): outputs and every gradient equal
    to eager."""
    torch.manual_seed(4)
    m = HyperLSTM(I, hidden, hyper_size=6, embedding_size=embedding_size).to(dtype)
    x = torch.randn(5, 3, I, dtype=dtype)
    assert_same(run(m, x, None, True), run(m, x, None, False), tol=1e-10 if dtype == torch.float64 else 2e-5)


def test_sequence_loops_need_mkl_and_can_be_switched_off(step_path, monkeypatch):
    """Without MKL in torch's library (another BLAS, whose integer size is unknown) the loops stay
    off and the Python step loop runs; HYPERNETWORKS_SEQUENCE_LOOPS=0 switches them off too."""
    if step_path != "loops":
        pytest.skip("concerns only the sequence loops, so it runs once, in the loops variant")
    lib = _kernels.library()
    monkeypatch.setattr(_kernels, "_torch_blas", lambda: None)
    assert _kernels._declare_loops(lib) is False
    monkeypatch.undo()
    assert _kernels._declare_loops(lib) is True
    import subprocess
    import sys
    code = "from hypernetworks.nn import _kernels; print(_kernels.library() is not None, _kernels.sequence_loops())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, _kernels.LOOPS_ENV_VAR: "0"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "None"]


@pytest.mark.parametrize("dtype,ulps", [(torch.float64, 2.0), (torch.float32, 2.0)])
def test_kernel_sigmoid_and_tanh_are_within_two_ulps(dtype, ulps, step_path):
    """The kernels' own exp (Cephes-style, vectorisable) behind sigmoid and tanh: within 2 ulps of
    torch's on [-30, 30], finite, and saturating correctly far beyond exp's range (|x| up to 1e4)."""
    if step_path != "kernels":
        pytest.skip("concerns only the compiled kernels, so it runs once, in the kernels variant")
    fn = getattr(_kernels.library(), f"cell_fwd_{'f64' if dtype == torch.float64 else 'f32'}")
    S = 8192
    x = torch.cat([torch.linspace(-30, 30, S - 12, dtype=dtype),
                   torch.tensor([-1e4, -800.0, -709.5, -100.0, -1e-30, 0.0, 1e-30, 1e-6, 100.0, 709.5, 800.0, 1e4],
                                dtype=dtype)])
    pre = x.repeat(4).view(1, 4 * S).contiguous()
    c = torch.zeros(1, S, dtype=dtype)
    act, c_new, h = torch.empty(1, 4 * S, dtype=dtype), torch.empty(1, S, dtype=dtype), torch.empty(1, S, dtype=dtype)
    fn(1, S, pre.data_ptr(), 4 * S, None, 0, None, 0, None, None, None, None, 0.0, None, c.data_ptr(), act.data_ptr(),
       c_new.data_ptr(), h.data_ptr(), S, None, None, None, None, None)
    sig, tanh = act[0, :S], act[0, S:2 * S]
    assert torch.isfinite(act).all() and torch.isfinite(h).all()
    eps = torch.finfo(dtype).eps
    inner = x.abs() <= 30
    for got, want in ((sig, torch.sigmoid(x)), (tanh, torch.tanh(x))):
        rel = ((got - want).abs() / want.abs().clamp_min(torch.finfo(dtype).tiny))[inner]
        assert rel.max().item() <= ulps * eps, rel.max().item() / eps
        torch.testing.assert_close(got[~inner], want[~inner], rtol=0, atol=1e-300 if dtype == torch.float64 else 1e-37)


# -- building the kernels ------------------------------------------------------------------------
def test_kernel_build_is_cached(tmp_path, monkeypatch, step_path):
    if step_path != "kernels":
        pytest.skip("concerns only building the compiled kernels, so it runs once, in the kernels variant")
    cxx = _kernels._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler found (install g++ or set CXX) to test the kernel build")
    monkeypatch.setenv("HYPERNETWORKS_CACHE", str(tmp_path))
    first = _kernels._build(cxx)
    assert first.is_relative_to(tmp_path) and first.exists()
    compiles = []
    real_run = _kernels.subprocess.run
    monkeypatch.setattr(_kernels.subprocess, "run",
                        lambda cmd, **kw: compiles.append(cmd) if "-shared" in cmd else real_run(cmd, **kw))
    assert _kernels._build(cxx) == first and not compiles  # the second use loads, no compile


def test_no_compiler_means_no_kernels(monkeypatch, step_path):
    if step_path != "kernels":
        pytest.skip("concerns only building the compiled kernels, so it runs once, in the kernels variant")
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert _kernels._compiler() is None
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert _kernels._compiler() is None


def test_fallback_without_compiler_warns_once_and_matches(tmp_path, step_path):
    """A fresh process whose compiler is missing (CXX names a program that does not exist, empty
    cache): ONE warning, then the PyTorch-op fused path, with the same results as eager."""
    if step_path != "kernels":
        pytest.skip("concerns only building the compiled kernels, so it runs once, in the kernels variant")
    import os
    import subprocess
    import sys
    code = """
import warnings, torch
warnings.simplefilter("always")
from hypernetworks.nn import HyperLSTM
torch.manual_seed(0)
m = HyperLSTM(3, 5, hyper_size=4, embedding_size=2, layer_norm=True).double()
x = torch.randn(4, 2, 3, dtype=torch.double)
with warnings.catch_warnings(record=True) as caught:
    fused = [m(x)[0] for _ in range(3)]
for c in m.cells:
    c.fused = False
eager = m(x)[0]
assert type(fused[0].grad_fn).__name__ == "_HyperLSTMFunctionBackward"
assert all(torch.allclose(f, eager, rtol=1e-12, atol=1e-12) for f in fused)
msgs = [str(w.message) for w in caught if "fused CPU kernels unavailable" in str(w.message)]
print(len(msgs)); print(msgs[0])
"""
    env = {**os.environ, "CXX": "/nonexistent/g++", "HYPERNETWORKS_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    count, message = res.stdout.strip().splitlines()[-2:]
    assert count == "1" and "/nonexistent/g++" in message
    assert not list(tmp_path.rglob("*.so"))


# -- reused work buffers (CPU) -------------------------------------------------------------------
def _slots(m) -> dict[str, int]:
    return {tag: len(v) for cell in m.cells for tag, v in _fused._WORKSPACES.get(cell, {}).items()}


def _grads(m):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]


@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_work_buffers_are_reused_and_change_nothing(kind, monkeypatch):
    """Three calls in a row (varying lengths, a packed batch among them) reuse one set of work
    buffers, and every output, state and gradient is bitwise what fresh buffers give."""
    torch.manual_seed(20)
    m = make(kind, layer_norm=True, num_layers=2, recurrent_dropout=0.2)
    inputs = [torch.randn(T, B, I, dtype=torch.double), _packed([3, 5, 1, 5, 2]),
              torch.randn(T + 2, B, I, dtype=torch.double), _packed([2, 4, 4])]
    results = {}
    for pool in ("0", "1"):
        monkeypatch.setenv("HYPERNETWORKS_WORKSPACE", pool)
        results[pool] = []
        for k, x in enumerate(inputs):
            torch.manual_seed(30 + k)
            results[pool].append(run_packed(m, x, True) if isinstance(x, torch.nn.utils.rnn.PackedSequence)
                                 else run(m, x, None, True))
    for a, b in zip(results["0"], results["1"], strict=True):
        assert_same(a, b, tol=0)
    slots = _slots(m)
    assert slots and set(slots.values()) == {1}, [k for k, v in slots.items() if v != 1]  # one buffer per tag served all four calls


@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_work_buffers_of_live_graphs_are_never_reused(kind, monkeypatch):
    """Three graphs alive at once (gradient accumulation), then a retained graph backpropagated
    twice with another forward in between: the same gradients as with fresh buffers."""
    torch.manual_seed(21)
    m = make(kind, layer_norm=True)
    xs = [torch.randn(T, B, I, dtype=torch.double) for _ in range(4)]

    def scenario():
        m.zero_grad(set_to_none=True)
        outs = [m(x)[0] for x in xs[:3]]  # three graphs: two pooled buffer sets, the third fresh
        sum((k + 1) * (o * o).sum() for k, o in enumerate(outs)).backward()
        first = _grads(m)
        m.zero_grad(set_to_none=True)
        loss = m(xs[3])[0].pow(2).sum()
        loss.backward(retain_graph=True)
        m(xs[0])[0].sum().backward()  # a forward + backward while the retained graph holds its buffers
        loss.backward()
        return first + _grads(m)

    monkeypatch.setenv("HYPERNETWORKS_WORKSPACE", "0")
    expected = scenario()
    monkeypatch.setenv("HYPERNETWORKS_WORKSPACE", "1")
    for _ in range(2):
        got = scenario()
        for g, h in zip(expected, got, strict=True):
            torch.testing.assert_close(g, h, rtol=0, atol=0)
    assert max(_slots(m).values()) == 2


@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_cuda_graphed_falls_back_to_the_layer_off_cuda(kind):
    """``layer.cuda_graphed(sample)`` captures CUDA graphs only for CUDA tensors; on CPU (and for a
    PackedSequence) the wrapper says why not and calls the layer itself: the same outputs, states and
    gradients, and no second copy of the layer's parameters in its state dict."""
    torch.manual_seed(5)
    m = make(kind, layer_norm=True)
    x = torch.randn(T, B, I, dtype=torch.double)
    hx = tuple(torch.randn(1, B, n, dtype=torch.double) for n in m.cells[0].state_sizes)
    g = m.cuda_graphed(x, hx)
    assert not g.graphed and "not a CUDA tensor" in g.why_not
    assert set(g.state_dict()) == {f"module.{k}" for k in m.state_dict()}
    for state in (hx, None):
        want = run(m, x, state, fused=True)
        set_fused(m, True)
        m.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out, new_state = g(xg, state)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        ((out * weights).sum() + sum((k + 1) * s.pow(2).sum() for k, s in enumerate(new_state))).backward()
        torch.testing.assert_close(out, want[0], rtol=0, atol=0)
        for s, t in zip(new_state, want[1], strict=True):
            torch.testing.assert_close(s, t, rtol=0, atol=0)
        torch.testing.assert_close(xg.grad, want[2][0], rtol=0, atol=0)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([T, T - 1]), enforce_sorted=False)
    assert "PackedSequence" in m.cuda_graphed(packed).why_not


def test_cuda_graphed_wrapper_logic_with_a_stand_in_capture(monkeypatch):
    """The wrapper's own logic, which on a GPU wraps torch.cuda.make_graphed_callables, run on CPU with a
    stand-in capture (the tensors-in, tensors-out callable it would capture, called directly): replays
    only calls that match the capture, returns the state in the form it was given, and falls back to the
    layer for anything else."""
    from hypernetworks.nn import HyperRNN
    from hypernetworks.nn._sequence import CUDAGraphed

    captured = []

    def stand_in(flat, sample_args, num_warmup_iters=3, allow_unused_input=False):
        assert all(isinstance(a, torch.Tensor) for a in sample_args)  # what the real one requires
        captured.append(len(sample_args))
        flat(*sample_args)
        return flat

    monkeypatch.setattr(CUDAGraphed, "_capture_devices", ("cuda", "cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in)
    torch.manual_seed(6)
    x = torch.randn(T, B, I, dtype=torch.double)
    rnn = HyperRNN(I, H, hyper_size=HH, embedding_size=NZ).double()
    m = make("hyper", layer_norm=True)
    cases = [
        (m, None),                                                               # no state: the full tuple back
        (m, tuple(torch.randn(1, B, n, dtype=torch.double) for n in m.cells[0].state_sizes)),  # the 4-tuple
        (m, (torch.randn(1, B, H, dtype=torch.double), torch.randn(1, B, H, dtype=torch.double))),  # nn.LSTM's pair
        (rnn, torch.randn(1, B, H, dtype=torch.double)),                         # nn.RNN's single tensor
    ]
    for layer, hx in cases:
        g = layer.cuda_graphed(x, hx)
        assert g.graphed and g.why_not is None
        calls = []
        orig = g._flat.forward
        monkeypatch.setattr(g._flat, "forward", lambda *a: calls.append(1) or orig(*a))
        out, state = g(x, hx)
        want_out, want_state = layer(x, hx)
        assert calls == [1]  # replayed
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        assert type(state) is type(want_state)
        for s, t in zip(state if isinstance(state, tuple) else (state,),
                        want_state if isinstance(want_state, tuple) else (want_state,), strict=True):
            torch.testing.assert_close(s, t, rtol=0, atol=0)
        # anything else than the capture runs the layer itself
        g(x[:-1], hx)                                       # another length
        g(x.requires_grad_(True), hx)                       # another requires_grad
        x = x.detach()
        g(x, None if hx is not None else tuple(torch.zeros(1, B, n, dtype=torch.double)
                                               for n in layer.cells[0].state_sizes))  # hx given or not
        layer.eval()
        g(x, hx)                                            # another mode
        layer.train()
        assert calls == [1]
    assert captured == [1, 5, 3, 2]

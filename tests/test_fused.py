"""The fused whole-sequence paths (hypernetworks/nn/_fused.py) against the eager per-step path."""
from __future__ import annotations

import itertools

import pytest
import torch

from hypernetworks.nn import LSTM, HyperLSTM
from hypernetworks.nn import _fused

I, H, HH, NZ, T, B = 3, 5, 4, 2, 4, 2


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

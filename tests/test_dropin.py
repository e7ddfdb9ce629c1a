"""Drop-in compatibility with torch.nn.LSTM / nn.LSTMCell / nn.RNN.

Training scripts written for the torch modules run with this package's modules swapped in;
bidirectional layers have nn.LSTM's layout and match the literal equations run per direction."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

from hypernetworks import LSTM, HyperLSTM, HyperLSTMCell, HyperRNN, HyperRNNCell, LSTMCell
from hypernetworks.nn import _fused
from reference import ref_bidirectional, torch_lstm_weights_to_igfo

I, H, HH, NZ = 4, 6, 5, 2


def perturb_(module: nn.Module, scale: float = 0.3) -> nn.Module:
    g = torch.Generator().manual_seed(321)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def hyper(*args, **kw):
    return HyperLSTM(*args, hyper_size=HH, embedding_size=NZ, **kw)


# ------------------------------------------------------------ a script written for nn.LSTM
class WordLM(nn.Module):
    """The shape of PyTorch's word_language_model example: embedding, rnn, decoder."""

    def __init__(self, rnn: nn.Module, ntoken: int, ninp: int, nhid: int, nlayers: int):
        super().__init__()
        self.drop = nn.Dropout(0.1)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = rnn
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers

    def forward(self, input, hidden):
        output, hidden = self.rnn(self.drop(self.encoder(input)), hidden)
        return self.decoder(self.drop(output)), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def repackage_hidden(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


def nn_lstm_training_script(make_rnn, save_path) -> tuple[float, float, float]:
    """Train with truncated BPTT, keep the best model by validation loss (torch.save of the whole
    model), reload it, call flatten_parameters() and evaluate: the public scripts' pattern."""
    torch.manual_seed(0)
    ntoken, bsz, bptt, nlayers = 11, 4, 5, 2
    stream = torch.arange(400) % ntoken  # a learnable cyclic sequence
    train = stream[:320].view(bsz, -1).t().contiguous()  # (T, B), time-major as in the example
    val = stream[320:].view(bsz, -1).t().contiguous()
    model = WordLM(make_rnn(8, 8, nlayers), ntoken, 8, 8, nlayers)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)

    def evaluate(data):
        model.eval()
        hidden, total = model.init_hidden(bsz), 0.0
        with torch.no_grad():
            for i in range(0, data.size(0) - 1, bptt):
                seq = min(bptt, data.size(0) - 1 - i)
                out, hidden = model(data[i:i + seq], hidden)
                total += seq * F.cross_entropy(out.view(-1, ntoken), data[i + 1:i + 1 + seq].reshape(-1)).item()
                hidden = repackage_hidden(hidden)
        return total / (data.size(0) - 1)

    first = evaluate(val)
    best = math.inf
    for _ in range(3):
        model.train()
        hidden = model.init_hidden(bsz)
        for i in range(0, train.size(0) - 1, bptt):
            seq = min(bptt, train.size(0) - 1 - i)
            hidden = repackage_hidden(hidden)
            model.zero_grad()
            out, hidden = model(train[i:i + seq], hidden)
            F.cross_entropy(out.view(-1, ntoken), train[i + 1:i + 1 + seq].reshape(-1)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
        loss = evaluate(val)
        if loss < best:
            with open(save_path, "wb") as f:
                torch.save(model, f)
            best = loss
    with open(save_path, "rb") as f:
        # whole-module pickling is what such scripts do; safe here only because this test wrote
        # the file a few lines above (the project's own loaders never unpickle: weights_only=True)
        model = torch.load(f, weights_only=False)
        model.rnn.flatten_parameters()  # after loading, as the example does for its RNNs
    return first, best, evaluate(val)


@pytest.mark.parametrize("name", ["nn.LSTM", "HyperLSTM", "LSTM", "ln-HyperLSTM"])
def test_nn_lstm_training_script_runs_with_the_module_swapped_in(name, tmp_path):
    make = {"nn.LSTM": lambda i, h, n: nn.LSTM(i, h, n),
            "HyperLSTM": lambda i, h, n: hyper(i, h, n),
            "LSTM": lambda i, h, n: LSTM(i, h, n),
            "ln-HyperLSTM": lambda i, h, n: hyper(i, h, n, layer_norm=True)}[name]
    first, best, reloaded = nn_lstm_training_script(make, tmp_path / "model.pt")
    assert best < first  # it trained
    assert reloaded == pytest.approx(best, rel=1e-6)  # the reloaded best model is the saved one


def test_unpacking_h_n_c_n_like_nn_lstm():
    x = torch.randn(5, 3, I)
    m = hyper(I, H, 2, pair_state=True)
    out, (h_n, c_n) = m(x)  # nn.LSTM's unpacking, with no hx
    assert h_n.shape == (2, 3, H) and c_n.shape == (2, 3, H + 2 * HH)
    m.pair_state = False
    out4, (h4, c4, hh4, hc4) = m(x)
    torch.testing.assert_close(out, out4)
    torch.testing.assert_close(h_n, h4)
    torch.testing.assert_close(c_n, torch.cat([c4, hh4, hc4], -1))


@pytest.mark.parametrize("kind", ["hyper", "hyper-ln", "rnn"])
def test_pair_state_continues_exactly(kind):
    torch.manual_seed(1)
    if kind == "rnn":
        m = perturb_(HyperRNN(I, H, 2, hyper_size=HH, embedding_size=NZ)).double()
        h0 = torch.zeros(2, 3, H, dtype=torch.double)  # nn.RNN's tensor hx
    else:
        m = perturb_(hyper(I, H, 2, layer_norm=kind == "hyper-ln")).double()
        h0 = (torch.zeros(2, 3, H, dtype=torch.double),) * 2  # nn.LSTM's (h_0, c_0)
    x = torch.randn(9, 3, I, dtype=torch.double)
    full_out, full_state = m(x)  # the package's own form, one call
    out1, s = m(x[:4], h0)
    out2, s = m(x[4:], s)
    torch.testing.assert_close(torch.cat([out1, out2]), full_out)
    if kind == "rnn":
        assert isinstance(s, torch.Tensor) and s.shape == (2, 3, H + HH)
        torch.testing.assert_close(s, torch.cat(full_state, -1))
        torch.testing.assert_close(s[..., :H], full_state[0])  # nn.RNN's h_n
    else:
        assert len(s) == 2 and s[1].shape == (2, 3, H + 2 * HH)
        torch.testing.assert_close(s[0], full_state[0])  # exactly the main h
        torch.testing.assert_close(s[1], torch.cat(full_state[1:], -1))


# ------------------------------------------------------------ a script written for nn.LSTMCell
def lstm_cell_script(make_cell, dtype) -> list[float]:
    """``h, c = cell(x_t, (h, c))`` from zero (h, c) of nn.LSTMCell's shapes, under LBFGS."""
    torch.manual_seed(0)
    T, B = 6, 8
    cell = make_cell(3, 5).to(dtype)
    head = nn.Linear(5, 1).to(dtype)
    x = torch.randn(T, B, 3, dtype=dtype)
    y = x.sum((0, 2)).unsqueeze(-1) / 4
    opt = torch.optim.LBFGS([*cell.parameters(), *head.parameters()], lr=0.5, max_iter=4)

    def closure():
        opt.zero_grad()
        h = torch.zeros(B, 5, dtype=dtype)
        c = torch.zeros(B, 5, dtype=dtype)
        for t in range(T):
            h, c = cell(x[t], (h, c))
        loss = F.mse_loss(head(h), y)
        loss.backward()
        return loss

    return [opt.step(closure).item() for _ in range(4)] + [closure().item()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["nn.LSTMCell", "HyperLSTMCell", "LSTMCell"])
def test_nn_lstm_cell_loop_runs_with_the_cell_swapped_in(name, dtype):
    make = {"nn.LSTMCell": nn.LSTMCell, "LSTMCell": LSTMCell,
            "HyperLSTMCell": lambda i, h: HyperLSTMCell(i, h, hyper_size=4, embedding_size=2, layer_norm=True)}[name]
    losses = lstm_cell_script(make, dtype)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nn_lstm_cell_loop_one_step_function_equals_eager(dtype):
    """The same LBFGS loop with the one-step Function (no layer norm) and with the eager ops:
    the same losses (without layer norm this set-up diverges at LBFGS's last step on both paths,
    so float32 compares the steps before it)."""
    def make(fused):
        def build(i, h):
            cell = HyperLSTMCell(i, h, hyper_size=4, embedding_size=2)
            cell.fused = fused
            return cell
        return build
    one_step, eager = lstm_cell_script(make(True), dtype), lstm_cell_script(make(False), dtype)
    n, tol = (4, 1e-5) if dtype == torch.float32 else (5, 1e-9)
    torch.testing.assert_close(torch.tensor(one_step[:n]), torch.tensor(eager[:n]), rtol=tol, atol=0)


def test_hyper_cell_pair_layout():
    torch.manual_seed(2)
    cell = perturb_(HyperLSTMCell(I, H, hyper_size=HH, embedding_size=NZ)).double()
    x = torch.randn(3, 2, I, dtype=torch.double)
    four = tuple(torch.zeros(2, n, dtype=torch.double) for n in (H, H, HH, HH))
    h, c = torch.zeros(2, H, dtype=torch.double), torch.zeros(2, H, dtype=torch.double)
    for t in range(3):
        four = cell(x[t], four)
        h, c = cell(x[t], (h, c))
        assert torch.equal(h, four[0])  # exactly the main h
        assert c.shape == (2, H + 2 * HH)
        torch.testing.assert_close(c, torch.cat(four[1:], -1))  # to rounding: the split c is strided
    # unbatched, too
    h1, c1 = cell(x[0, 0], (torch.zeros(H, dtype=torch.double), torch.zeros(H, dtype=torch.double)))
    assert h1.shape == (H,) and c1.shape == (H + 2 * HH,)
    with pytest.raises(ValueError, match=r"hx\[1\]"):
        cell(x[0], (h, torch.zeros(2, H + 1, dtype=torch.double)))


@pytest.mark.parametrize("path", ["one-step", "eager", "layer-norm"])
def test_hyper_cell_without_state_returns_lstm_cells_pair(path):
    """``h, c = cell(x)`` as for nn.LSTMCell (a decoder's first step), batched and unbatched: the
    same pair as from zero (h, c), and a loop continues from it."""
    torch.manual_seed(5)
    cell = perturb_(HyperLSTMCell(I, H, hyper_size=HH, embedding_size=NZ, layer_norm=path == "layer-norm")).double()
    cell.fused = path != "eager"
    ref = nn.LSTMCell(I, H).double()
    x = torch.randn(4, 2, I, dtype=torch.double)
    for xb in (x[0], x[0, 0]):  # (B, I) and unbatched (I,), as nn.LSTMCell accepts both
        h, c = cell(xb)
        h_ref, c_ref = ref(xb)
        assert h.shape == h_ref.shape and c.shape == (*c_ref.shape[:-1], H + 2 * HH)
        zeros = torch.zeros_like(h_ref)
        h0, c0 = cell(xb, (zeros, zeros))
        assert torch.equal(h, h0) and torch.equal(c, c0)
        four = cell(xb, (zeros, zeros, zeros[..., :HH].clone(), zeros[..., :HH].clone()))
        assert len(four) == 4
        torch.testing.assert_close(h, four[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(c, torch.cat(four[1:], -1), rtol=0, atol=1e-12)
    h, c = cell(x[0])  # a decoder: the first step without state, then the pair it returned
    for t in range(1, 4):
        h, c = cell(x[t], (h, c))
    h_ref, c_ref = None, None
    state = tuple(torch.zeros(2, n, dtype=torch.double) for n in (H, H, HH, HH))
    for t in range(4):
        state = cell(x[t], state)
    torch.testing.assert_close(h, state[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(c, torch.cat(state[1:], -1), rtol=0, atol=1e-12)


def test_hyper_rnn_cell_tensor_state():
    torch.manual_seed(3)
    cell = perturb_(HyperRNNCell(I, H, hyper_size=HH, embedding_size=NZ)).double()
    x = torch.randn(2, I, dtype=torch.double)
    h, h_hat = cell(x)
    s = cell(x, torch.zeros(2, H, dtype=torch.double))
    assert isinstance(s, torch.Tensor) and s.shape == (2, H + HH)
    torch.testing.assert_close(s, torch.cat([h, h_hat], -1))
    torch.testing.assert_close(cell(x, s), torch.cat(cell(x, (h, h_hat)), -1))


def test_a_bare_tensor_is_still_no_lstm_state():
    with pytest.raises(ValueError, match="hx"):
        hyper(I, H)(torch.randn(3, 2, I), torch.zeros(1, 2, H))


# ------------------------------------------------------------ constructor and attributes
def test_constructor_order_and_attributes_match_nn_lstm():
    args = (I, H, 2, False, True, 0.25, True)  # ..., bias, batch_first, dropout, bidirectional
    ref = nn.LSTM(*args)
    for m in (LSTM(*args), hyper(*args)):
        for name in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size"):
            assert getattr(m, name) == getattr(ref, name), name
        m.flatten_parameters()  # exists, does nothing
        before = [p.clone() for p in m.parameters()]
        m.reset_parameters()  # re-initialises both directions
        assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters()) if p.dim() == 2)
    rnn_args = (I, H, 2, "tanh", False, True, 0.25, True)
    ref_rnn, ours = nn.RNN(*rnn_args), HyperRNN(*rnn_args)
    for name in ("mode", "input_size", "hidden_size", "num_layers", "nonlinearity", "bias", "batch_first",
                 "dropout", "bidirectional"):
        assert getattr(ours, name) == getattr(ref_rnn, name), name
    ours.flatten_parameters()
    with pytest.raises(ValueError, match="nonlinearity"):
        HyperRNN(I, H, nonlinearity="relu")


def test_device_and_dtype_arguments():
    for cls in (LSTM, HyperLSTM, HyperRNN):
        m = cls(I, H, dtype=torch.float64, device="cpu")
        assert all(p.dtype == torch.float64 for p in m.parameters())


def test_unidirectional_state_dict_keys_unchanged():
    keys = set(hyper(I, H, 2, layer_norm=True).state_dict())
    assert not any("reverse" in k for k in keys) and "cells.1.scaling.d_weight" in keys
    assert {k for k in hyper(I, H, 1, bidirectional=True).state_dict() if "reverse" in k} == {
        k.replace("cells.", "cells_reverse.") for k in hyper(I, H, 1).state_dict()}


@pytest.mark.parametrize("cls", [LSTM, HyperLSTM])
def test_proj_size_is_refused_with_a_reason(cls):
    with pytest.raises(ValueError, match="proj_size"):
        cls(I, H, proj_size=3)
    assert cls(I, H, proj_size=0).proj_size == 0


@pytest.mark.parametrize("make", [lambda: LSTM(I, H), lambda: hyper(I, H), lambda: HyperRNN(I, H, hyper_size=HH),
                                  lambda: HyperLSTMCell(I, H, hyper_size=HH), lambda: LSTMCell(I, H)])
def test_dtype_mismatch_is_a_clear_error(make):
    m = make()
    cell = isinstance(m, (HyperLSTMCell, LSTMCell))
    x = torch.randn(3, I, dtype=torch.float64) if cell else torch.randn(5, 3, I, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64.*float32"):
        m(x)
    with pytest.raises(TypeError, match="floating"):
        m(x.long())
    m.double()
    m(x)  # fine once they agree
    hx = (torch.zeros(3, H), torch.zeros(3, H)) if cell else (torch.zeros(1, 3, H), torch.zeros(1, 3, H))
    if not isinstance(m, HyperRNN):
        with pytest.raises(TypeError, match=r"hx\[0\]"):
            m(x, hx)


# ------------------------------------------------------------ bidirectional
def copy_torch_lstm_(ours: LSTM, ref: nn.LSTM) -> None:
    with torch.no_grad():
        for k in range(ref.num_layers):
            for cells, sfx in ((ours.cells, ""), (ours.cells_reverse, "_reverse")):
                cell = cells[k]
                cell.weight_ih.copy_(torch_lstm_weights_to_igfo(getattr(ref, f"weight_ih_l{k}{sfx}")))
                cell.weight_hh.copy_(torch_lstm_weights_to_igfo(getattr(ref, f"weight_hh_l{k}{sfx}")))
                cell.bias.copy_(torch_lstm_weights_to_igfo(getattr(ref, f"bias_ih_l{k}{sfx}")
                                                           + getattr(ref, f"bias_hh_l{k}{sfx}")))


@pytest.mark.parametrize("batch_first", [False, True])
def test_bidirectional_lstm_equals_torch_given_the_same_weights(batch_first):
    torch.manual_seed(4)
    ref = nn.LSTM(I, H, 2, batch_first=batch_first, bidirectional=True).double()
    ours = LSTM(I, H, 2, batch_first=batch_first, bidirectional=True).double()
    copy_torch_lstm_(ours, ref)
    x = torch.randn(5, 3, I, dtype=torch.double)
    hx = tuple(torch.randn(4, x.size(0 if batch_first else 1), H, dtype=torch.double) for _ in range(2))
    for args in ((x,), (x, hx)):
        out, (h, c) = ours(*args)
        ref_out, (ref_h, ref_c) = ref(*args)
        assert out.shape == ref_out.shape == (5, 3, 2 * H)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(h, ref_h)
        torch.testing.assert_close(c, ref_c)
    # packed, unsorted lengths: the reverse direction reads each sequence within its own length
    seqs = [torch.randn(n, I, dtype=torch.double) for n in (3, 5, 1, 4)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    hx = tuple(torch.randn(4, len(seqs), H, dtype=torch.double) for _ in range(2))  # in the caller's order
    for args in ((packed,), (packed, hx)):
        out, (h, c) = ours(*args)
        ref_out, (ref_h, ref_c) = ref(*args)
        torch.testing.assert_close(out.data, ref_out.data)
        assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
        torch.testing.assert_close(h, ref_h)
        torch.testing.assert_close(c, ref_c)
    # unbatched
    out, (h, c) = ours(x[:, 0])
    ref_out, (ref_h, _) = ref(x[:, 0])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h, ref_h)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_bidirectional_matches_literal_equations_packed_and_padded(kind, layer_norm):
    torch.manual_seed(5)
    m = hyper(I, H, 2, bidirectional=True, layer_norm=layer_norm) if kind == "hyper" else \
        LSTM(I, H, 2, bidirectional=True, layer_norm=layer_norm)
    m = perturb_(m).double().eval()
    n_state = 4 if kind == "hyper" else 2
    lengths = [4, 6, 1, 3]
    seqs = [torch.randn(n, I, dtype=torch.double) for n in lengths]
    want = ref_bidirectional(m, seqs, hyper=kind == "hyper")
    out, state = m(pack_sequence(seqs, enforce_sorted=False))  # packed
    padded, _ = pad_packed_sequence(out)
    assert len(state) == n_state and state[0].shape == (4, len(seqs), H)
    for b, (w_out, w_state) in enumerate(want):
        torch.testing.assert_close(padded[:lengths[b], b], w_out)
        assert padded[lengths[b]:, b].abs().sum() == 0
        for s, w in zip(state, w_state):
            torch.testing.assert_close(s[:, b], w)
    same = torch.stack([torch.randn(5, I, dtype=torch.double) for _ in range(3)], 1)  # padded (T, B, I)
    want = ref_bidirectional(m, list(same.unbind(1)), hyper=kind == "hyper")
    out, state = m(same)
    for b, (w_out, w_state) in enumerate(want):
        torch.testing.assert_close(out[:, b], w_out)
        for s, w in zip(state, w_state):
            torch.testing.assert_close(s[:, b], w)


def test_bidirectional_hyper_uses_the_fused_path_and_agrees_with_eager(monkeypatch):
    torch.manual_seed(6)
    m = perturb_(hyper(I, H, 2, bidirectional=True, layer_norm=True)).double()
    x = torch.randn(5, 3, I, dtype=torch.double, requires_grad=True)
    calls = []
    real = _fused.hyper_lstm_sequence
    monkeypatch.setattr(_fused, "hyper_lstm_sequence", lambda *a: calls.append(1) or real(*a))
    out, state = m(x)
    assert len(calls) == 4  # every layer and direction
    (out.square().sum() + state[1].sum()).backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    for cell in [*m.cells, *m.cells_reverse]:
        cell.fused = False
    m.zero_grad()
    x.grad = None
    out2, state2 = m(x)
    (out2.square().sum() + state2[1].sum()).backward()
    torch.testing.assert_close(out, out2)
    for g, p in zip(grads, [x.grad] + [p.grad for p in m.parameters()]):
        torch.testing.assert_close(g, p)


def test_bidirectional_activity_and_hx_shapes():
    m = hyper(I, H, 2, bidirectional=True)
    x = torch.randn(5, 3, I)
    out, state, activity = m.forward_with_activity(x)
    assert out.shape == (5, 3, 2 * H) and len(activity) == 4
    assert activity[1]["d_h"].shape == (5, 3, 4, H)
    out2, _ = m(x, state)
    assert out2.shape == (5, 3, 2 * H)
    with pytest.raises(ValueError, match=r"hx\[0\]"):
        m(x, tuple(s[:2] for s in state))  # num_layers, not num_layers * 2
    rnn = HyperRNN(I, H, 2, bidirectional=True, hyper_size=HH)
    out, h_n = rnn(x, torch.zeros(4, 3, H))
    assert out.shape == (5, 3, 2 * H) and h_n.shape == (4, 3, H + HH)


@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_bidirectional_hyper(packed):
    torch.manual_seed(7)
    m = perturb_(HyperLSTM(3, 4, 2, bidirectional=True, hyper_size=3, embedding_size=2, layer_norm=True)).double()
    lengths = [4, 2, 3]
    x = torch.randn(4, 3, 3, dtype=torch.double, requires_grad=True)
    names, params = zip(*m.named_parameters())

    def fn(x, *ps):
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, state = torch.func.functional_call(m, dict(zip(names, ps)), (inp,))
        return (out.data if packed else out), *state

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


def test_bad_bidirectional_is_refused():
    with pytest.raises(ValueError, match="bidirectional"):
        HyperLSTM(I, H, bidirectional="yes")
    assert LSTM(I, H, bidirectional=1).bidirectional is True


def test_bidirectional_packed_takes_the_per_direction_packed_path_and_agrees_with_eager(monkeypatch):
    torch.manual_seed(8)
    m = perturb_(hyper(I, H, 2, bidirectional=True, layer_norm=True)).double()
    seqs = [torch.randn(n, I, dtype=torch.double) for n in (3, 5, 2)]
    calls = []
    real = _fused.packed_forward
    monkeypatch.setattr(_fused, "packed_forward", lambda *a: calls.append(real(*a) is not None) or real(*a))
    out, state = m(pack_sequence(seqs, enforce_sorted=False))
    assert len(calls) == 4  # both directions of both layers go through the same per-direction run
    kernels = getattr(_fused, "_kernels_for", lambda x: None)(seqs[0])
    assert all(calls) or kernels is None  # fused wherever this machine has the fused kernels
    for cell in [*m.cells, *m.cells_reverse]:
        cell.fused = False
    out2, state2 = m(pack_sequence(seqs, enforce_sorted=False))
    torch.testing.assert_close(out.data, out2.data)
    for a, b in zip(state, state2):
        torch.testing.assert_close(a, b)

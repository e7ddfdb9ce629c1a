"""HyperLSTM / LSTM / HyperRNN: the paper's equations, nn.LSTM's contract, gradients, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

from hypernetworks import (LSTM, HyperLSTM, HyperLSTMCell, HyperRNN, HyperRNNCell, LSTMCell,
                           build_recurrent, gate_change_intensity)
from reference import (ref_hyper_lstm_step, ref_hyper_rnn_step, ref_layers, ref_lstm_step,
                       torch_lstm_weights_to_igfo)

I, H, HH, NZ = 5, 7, 6, 3


def perturb_(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """Move every parameter off its (often symmetric) initial value so tests see all paths."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def make(kind: str, num_layers=1, **kw):
    torch.manual_seed(0)
    if kind == "hyper":
        return HyperLSTM(I, H, num_layers=num_layers, hyper_size=HH, embedding_size=NZ, **kw)
    return LSTM(I, H, num_layers=num_layers, **kw)


# ---------------------------------------------------------------- equations vs reference
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_hyper_cell_matches_literal_equations(layer_norm, bias):
    torch.manual_seed(1)
    cell = perturb_(HyperLSTMCell(I, H, hyper_size=HH, embedding_size=NZ, bias=bias, layer_norm=layer_norm)).double()
    x = torch.randn(4, I, dtype=torch.double)
    state = tuple(torch.randn(4, n, dtype=torch.double) for n in (H, H, HH, HH))
    got = cell(x, state)
    want = ref_hyper_lstm_step(cell, x, *state)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_layer_matches_reference_over_time(kind, layer_norm):
    m = perturb_(make(kind, num_layers=2, layer_norm=layer_norm)).double().eval()
    x = torch.randn(6, 3, I, dtype=torch.double)
    out, state = m(x)
    ref_out, ref_state = ref_layers(m, x, hyper=kind == "hyper")
    torch.testing.assert_close(out, ref_out)
    for g, w in zip(state, ref_state):
        torch.testing.assert_close(g, w)


def test_lstm_cell_matches_literal_equations():
    torch.manual_seed(2)
    cell = perturb_(LSTMCell(I, H, layer_norm=True)).double()
    x, h, c = torch.randn(3, I).double(), torch.randn(3, H).double(), torch.randn(3, H).double()
    for g, w in zip(cell(x, (h, c)), ref_lstm_step(cell, x, h, c)):
        torch.testing.assert_close(g, w)


def test_hyper_rnn_cell_matches_literal_equations():
    torch.manual_seed(3)
    cell = perturb_(HyperRNNCell(I, H, hyper_size=HH, embedding_size=NZ)).double()
    x, h, hh = torch.randn(3, I).double(), torch.randn(3, H).double(), torch.randn(3, HH).double()
    for g, w in zip(cell(x, (h, hh)), ref_hyper_rnn_step(cell, x, h, hh)):
        torch.testing.assert_close(g, w)
    out, (h_n, hh_n) = HyperRNN(I, H, num_layers=2, hyper_size=HH)(torch.randn(4, 2, I))
    assert out.shape == (4, 2, H) and h_n.shape == (2, 2, H) and hh_n.shape == (2, 2, HH)


# ---------------------------------------------------------------- initialisation (PAPER.md)
def test_initialisation_follows_the_paper():
    m = HyperLSTM(I, H, hyper_size=HH, embedding_size=NZ)
    _, _, act = m.forward_with_activity(torch.randn(5, 2, I))
    a = act[0]
    # z_h = z_x = 1 and W_hd = W_xd = 0.1 / N_z, so every scaling vector starts at exactly 0.1
    torch.testing.assert_close(a["d_h"], torch.full_like(a["d_h"], 0.1))
    torch.testing.assert_close(a["d_x"], torch.full_like(a["d_x"], 0.1))
    # W_bd = 0: the dynamic bias starts at b_0, which is the forget bias +1 and 0 elsewhere
    expected_bias = torch.zeros(4, H)
    expected_bias[2] = 1.0
    torch.testing.assert_close(a["bias"], expected_bias.expand_as(a["bias"]))
    w = m.cells[0].weight_hh
    for block in w.chunk(4, 0):  # orthogonal per gate
        torch.testing.assert_close(block @ block.T, torch.eye(H), atol=1e-5, rtol=0)
    assert m.cells[0].scaling.z_weight[2 * 4 * NZ:].abs().sum() > 0  # W_bz ~ N(0, 0.01)


def test_layer_norm_keeps_forget_bias_after_the_norm():
    cell = HyperLSTMCell(I, H, hyper_size=HH, embedding_size=NZ, layer_norm=True)
    assert torch.equal(cell.gate_norm.bias[2], torch.ones(H))
    assert torch.equal(cell.hyper.gate_norm.bias[2], torch.ones(HH))


# ---------------------------------------------------------------- nn.LSTM equivalences
def neutralise_(cell: HyperLSTMCell, lstm_cell: nn.LSTMCell) -> None:
    """Set d_h = d_x = 1 and b(z) = b_0 and copy nn.LSTMCell's weights in."""
    s = cell.scaling
    with torch.no_grad():
        s.z_weight.zero_()
        s.z_bias.fill_(1.0)
        s.d_weight[:2].fill_(1.0 / cell.embedding_size)
        s.d_weight[2].zero_()
        s.bias.copy_(torch_lstm_weights_to_igfo(lstm_cell.bias_ih + lstm_cell.bias_hh))
        cell.weight_ih.copy_(torch_lstm_weights_to_igfo(lstm_cell.weight_ih))
        cell.weight_hh.copy_(torch_lstm_weights_to_igfo(lstm_cell.weight_hh))


def test_neutral_modulation_equals_torch_lstm_cell():
    torch.manual_seed(4)
    ref = nn.LSTMCell(I, H).double()
    cell = perturb_(HyperLSTMCell(I, H, hyper_size=HH, embedding_size=NZ)).double()
    neutralise_(cell, ref)
    x = torch.randn(6, 3, I, dtype=torch.double)
    state, ref_state = None, None
    for t in range(6):  # the hyper LSTM keeps running, but it no longer changes anything
        state = cell(x[t], state)  # nn.LSTMCell's pair from the first step: c carries the hyper state
        ref_state = ref(x[t], ref_state)
        torch.testing.assert_close(state[0], ref_state[0])
        torch.testing.assert_close(state[1][:, :H], ref_state[1])


def test_neutral_hyper_layer_equals_torch_lstm_multilayer():
    torch.manual_seed(5)
    ref = nn.LSTM(I, H, num_layers=2).double()
    m = perturb_(HyperLSTM(I, H, num_layers=2, hyper_size=HH, embedding_size=NZ)).double()
    for k, cell in enumerate(m.cells):
        tmp = nn.LSTMCell(cell.input_size, H).double()
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(tmp, name).copy_(getattr(ref, f"{name}_l{k}"))
        neutralise_(cell, tmp)
    x = torch.randn(5, 2, I, dtype=torch.double)
    out, (h, c, _, _) = m(x)
    ref_out, (ref_h, ref_c) = ref(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(c, ref_c)


def test_our_lstm_equals_torch_lstm_given_the_same_weights():
    torch.manual_seed(6)
    ref = nn.LSTM(I, H, num_layers=2, batch_first=True).double()
    m = LSTM(I, H, num_layers=2, batch_first=True).double()
    with torch.no_grad():
        for k, cell in enumerate(m.cells):
            cell.weight_ih.copy_(torch_lstm_weights_to_igfo(getattr(ref, f"weight_ih_l{k}")))
            cell.weight_hh.copy_(torch_lstm_weights_to_igfo(getattr(ref, f"weight_hh_l{k}")))
            cell.bias.copy_(torch_lstm_weights_to_igfo(getattr(ref, f"bias_ih_l{k}") + getattr(ref, f"bias_hh_l{k}")))
    x = torch.randn(3, 6, I, dtype=torch.double)
    h0, c0 = torch.randn(2, 3, H, dtype=torch.double), torch.randn(2, 3, H, dtype=torch.double)
    out, (h, c) = m(x, (h0, c0))
    ref_out, (ref_h, ref_c) = ref(x, (h0, c0))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(c, ref_c)


# ---------------------------------------------------------------- input forms and shapes
@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_shapes_for_every_input_form(kind):
    m = make(kind, num_layers=2)
    n_state = 4 if kind == "hyper" else 2
    sizes = [H, H, HH, HH][:n_state]
    out, state = m(torch.randn(7, 3, I))
    assert out.shape == (7, 3, H)
    assert [tuple(s.shape) for s in state] == [(2, 3, n) for n in sizes]
    out, _ = m(torch.randn(7, I))  # unbatched
    assert out.shape == (7, H)
    m.batch_first = True
    out, state = m(torch.randn(3, 7, I))
    assert out.shape == (3, 7, H) and state[0].shape == (2, 3, H)
    m.batch_first = False
    _, state = m(torch.randn(7, I))
    assert [tuple(s.shape) for s in state] == [(2, n) for n in sizes]


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_packed_sequence_equals_per_sequence_runs(kind, enforce_sorted):
    m = perturb_(make(kind, num_layers=2)).double().eval()
    lengths = [6, 4, 1] if enforce_sorted else [3, 6, 1, 4]
    seqs = [torch.randn(n, I, dtype=torch.double) for n in lengths]
    packed = pack_sequence(seqs, enforce_sorted=enforce_sorted)
    out, state = m(packed)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    padded, out_lengths = pad_packed_sequence(out)
    assert out_lengths.tolist() == lengths
    for b, seq in enumerate(seqs):
        single_out, single_state = m(seq.unsqueeze(1))
        torch.testing.assert_close(padded[: len(seq), b], single_out[:, 0])
        for s, ss in zip(state, single_state):
            torch.testing.assert_close(s[:, b], ss[:, 0])


@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_state_carried_across_calls_equals_one_call(kind):
    m = perturb_(make(kind, num_layers=2, layer_norm=True)).double().eval()
    x = torch.randn(9, 2, I, dtype=torch.double)
    full_out, full_state = m(x)
    out1, state = m(x[:4])
    out2, state = m(x[4:], state)
    torch.testing.assert_close(torch.cat([out1, out2]), full_out)
    for a, b in zip(state, full_state):
        torch.testing.assert_close(a, b)


def test_accepts_nn_lstm_state_and_runs_truncated_bptt_code_unchanged():
    """Code written for nn.LSTM: carry the state, detach it recursively, keep training."""

    def repackage_hidden(h):
        return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)

    torch.manual_seed(7)
    for rnn in (nn.LSTM(I, H, 2), make("hyper", num_layers=2), make("lstm", num_layers=2)):
        head = nn.Linear(H, I)
        opt = torch.optim.SGD([*rnn.parameters(), *head.parameters()], lr=0.1)
        data = torch.randn(12, 2, I)
        hidden = (torch.zeros(2, 2, H), torch.zeros(2, 2, H))  # nn.LSTM's (h0, c0)
        for start in range(0, 12, 4):
            hidden = repackage_hidden(hidden)
            out, hidden = rnn(data[start:start + 4], hidden)
            loss = (head(out) - data[start:start + 4]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.isfinite(loss)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("layer_norm", [False, True])
def test_gradcheck_hyper_cell(layer_norm):
    torch.manual_seed(8)
    cell = perturb_(HyperLSTMCell(3, 4, hyper_size=3, embedding_size=2, layer_norm=layer_norm)).double()
    x = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    state = tuple(torch.randn(2, n, dtype=torch.double, requires_grad=True) for n in (4, 4, 3, 3))
    params = list(cell.parameters())
    assert torch.autograd.gradcheck(lambda x, *s_p: cell(x, s_p[:4]), (x, *state, *params))
    assert torch.autograd.gradcheck(lambda x, *s_p: cell(x, s_p[:4]), (x, *state, *params), fast_mode=True)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_gradcheck_layer(kind, layer_norm):
    torch.manual_seed(9)
    if kind == "hyper":
        m = HyperLSTM(3, 4, num_layers=2, hyper_size=3, embedding_size=2, layer_norm=layer_norm)
    else:
        m = LSTM(3, 4, num_layers=2, layer_norm=layer_norm)
    m = perturb_(m).double()
    x = torch.randn(4, 2, 3, dtype=torch.double, requires_grad=True)
    names, params = zip(*m.named_parameters())

    def fn(x, *ps):
        out, state = torch.func.functional_call(m, dict(zip(names, ps)), (x,))
        return out, *state

    # fast_mode checks a random projection of the full Jacobian: every parameter still counts
    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


def test_gradients_reach_every_parameter():
    # Off the initial point: at the paper's init W_hz = W_xz = W_bd = 0, so the hyper LSTM's own
    # weights get exactly zero gradient until the first update moves those.
    m = perturb_(make("hyper", layer_norm=True))
    out, state = m(torch.randn(5, 2, I))
    (out.sum() + state[1].sum()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


# ---------------------------------------------------------------- dropout and determinism
def test_determinism_under_a_seed():
    def run():
        torch.manual_seed(11)
        m = HyperLSTM(I, H, num_layers=2, dropout=0.3, recurrent_dropout=0.3, hyper_size=HH).train()
        torch.manual_seed(12)
        out, _ = m(torch.randn(6, 2, I))
        out.sum().backward()
        return out.detach(), m.cells[0].weight_hh.grad.clone()

    (o1, g1), (o2, g2) = run(), run()
    assert torch.equal(o1, o2) and torch.equal(g1, g2)


@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_dropout_is_off_in_eval_mode(kind):
    noisy = make(kind, num_layers=2, dropout=0.5, recurrent_dropout=0.5)
    clean = make(kind, num_layers=2)
    clean.load_state_dict(noisy.state_dict())
    x = torch.randn(6, 2, I)
    noisy.train()
    a, _ = noisy(x)
    b, _ = noisy(x)
    assert not torch.equal(a, b)  # dropout is really active in training mode
    noisy.eval()
    clean.eval()
    torch.testing.assert_close(noisy(x)[0], clean(x)[0])
    torch.testing.assert_close(noisy(x)[0], noisy(x)[0])


# ---------------------------------------------------------------- activity for pictures
def test_activity_matches_forward_and_intensity_measures_change():
    m = perturb_(make("hyper", num_layers=2)).eval()
    x = torch.randn(6, 3, I)
    out, state = m(x)
    out2, state2, activity = m.forward_with_activity(x)
    torch.testing.assert_close(out, out2)
    assert len(activity) == 2
    assert activity[0]["d_h"].shape == (6, 3, 4, H) and activity[0]["h_hat"].shape == (6, 3, HH)
    inten = gate_change_intensity(activity[0]["d_h"])
    assert inten.shape == (6, 3, 4)
    assert torch.all(inten[0] == 0) and torch.all(inten[1:] > 0)
    d = activity[0]["d_h"]
    torch.testing.assert_close(inten[3, 1, 2], (d[3, 1, 2] - d[2, 1, 2]).norm())
    _, _, lstm_act = make("lstm").forward_with_activity(x)
    assert "d_h" not in lstm_act[0]


def test_build_recurrent_selects_the_cell():
    assert isinstance(build_recurrent("lstm", I, H), LSTM)
    ln = build_recurrent("ln-hyperlstm", I, H, hyper_size=HH, embedding_size=NZ)
    assert isinstance(ln, HyperLSTM) and ln.cells[0].gate_norm is not None
    with pytest.raises(ValueError, match="cell"):
        build_recurrent("gru", I, H)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, name", [
    (dict(input_size=0, hidden_size=H), "input_size"),
    (dict(input_size=I, hidden_size=-1), "hidden_size"),
    (dict(input_size=I, hidden_size=H, num_layers=0), "num_layers"),
    (dict(input_size=I, hidden_size=H, hyper_size=0), "hyper_size"),
    (dict(input_size=I, hidden_size=H, embedding_size=0), "embedding_size"),
    (dict(input_size=I, hidden_size=H, dropout=1.0), "dropout"),
    (dict(input_size=I, hidden_size=H, dropout=-0.1), "dropout"),
    (dict(input_size=I, hidden_size=H, recurrent_dropout=1.5), "recurrent_dropout"),
])
def test_bad_constructor_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HyperLSTM(**kwargs)


@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_bad_forward_input_is_refused_not_broadcast(kind):
    m = make(kind, num_layers=2)
    with pytest.raises(ValueError, match="input"):
        m(torch.randn(2, 3, 4, I))  # wrong rank
    with pytest.raises(ValueError, match="input_size"):
        m(torch.randn(6, 3, I + 1))  # wrong feature size
    with pytest.raises(ValueError, match=r"hx\[0\]"):
        m(torch.randn(6, 3, I), (torch.zeros(2, 1, H), torch.zeros(2, 1, H)))  # batch 1 would broadcast
    with pytest.raises(ValueError, match=r"hx\[1\]"):
        m(torch.randn(6, 3, I), (torch.zeros(2, 3, H), torch.zeros(1, 3, H)))
    with pytest.raises(ValueError, match="hx"):
        m(torch.randn(6, 3, I), torch.zeros(2, 3, H))  # a bare tensor is not a state
    cell = HyperLSTMCell(I, H, hyper_size=HH)
    with pytest.raises(ValueError, match="input_size"):
        cell(torch.randn(3, I + 2))
    with pytest.raises(ValueError, match=r"hx\[2\]"):
        cell(torch.randn(3, I), (torch.zeros(3, H), torch.zeros(3, H), torch.zeros(3, HH + 1), torch.zeros(3, HH)))


# ---------------------------------------------------------------- the paper's switches
def _cell(**kw):
    torch.manual_seed(20)
    return perturb_(HyperLSTMCell(I, H, hyper_size=HH, embedding_size=NZ, **kw)).double()


def _state(B=3):
    g = torch.Generator().manual_seed(21)
    return tuple(torch.randn(B, n, generator=g, dtype=torch.double) for n in (H, H, HH, HH))


@pytest.mark.parametrize("layer_norm", [False, True])
def test_z_input_previous_follows_the_papers_equations(layer_norm):
    cur, prev = _cell(layer_norm=layer_norm), _cell(layer_norm=layer_norm, z_input="previous")
    prev.load_state_dict(cur.state_dict())  # same parameters, same names
    x, state = torch.randn(3, I, dtype=torch.double), _state()
    got_prev, got_cur = prev(x, state), cur(x, state)
    for g, w in zip(got_prev, ref_hyper_lstm_step(prev, x, *state)):  # z from h_hat_{t-1}
        torch.testing.assert_close(g, w)
    # the switch changes what the z projections read, nothing else: the hyper LSTM's step is the same
    torch.testing.assert_close(got_prev[2:], got_cur[2:])
    assert not torch.allclose(got_prev[0], got_cur[0])
    # over time, in a layer (which then runs the per-step path) and with gradients
    m = HyperLSTM(3, 4, num_layers=2, hyper_size=3, embedding_size=2, layer_norm=layer_norm, z_input="previous")
    m = perturb_(m).double()
    xs = torch.randn(5, 2, 3, dtype=torch.double)
    out, st = m(xs)
    ref_out, ref_st = ref_layers(m, xs, hyper=True)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(st, ref_st):
        torch.testing.assert_close(a, b)
    names, params = zip(*m.named_parameters())
    xs.requires_grad_()
    fn = lambda x, *ps: torch.func.functional_call(m, dict(zip(names, ps)), (x,))[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (xs, *params), fast_mode=True)


def test_z_input_default_is_the_original_codes():
    assert HyperLSTMCell(I, H).z_input == "current"
    with pytest.raises(ValueError, match="z_input"):
        HyperLSTMCell(I, H, z_input="next")


def test_gain_only_layer_norm_matches_reference_and_equals_the_default_at_init():
    with_bias, gain_only = _cell(layer_norm=True), _cell(layer_norm=True, layer_norm_bias=False)
    for m in (gain_only, gain_only.hyper):
        assert m.gate_norm.bias is None and m.cell_norm.bias is None
    dropped = set(with_bias.state_dict()) - set(gain_only.state_dict())
    assert dropped == {"gate_norm.bias", "cell_norm.bias", "hyper.gate_norm.bias", "hyper.cell_norm.bias"}
    assert (sum(p.numel() for p in with_bias.parameters()) - sum(p.numel() for p in gain_only.parameters())
            == 5 * H + 5 * HH)
    x, state = torch.randn(3, I, dtype=torch.double), _state()
    for g, w in zip(gain_only(x, state), ref_hyper_lstm_step(gain_only, x, *state)):
        torch.testing.assert_close(g, w)
    # at initialisation the forget +1 is a constant after the norm instead of the norm's bias: same function
    a = HyperLSTM(I, H, hyper_size=HH, embedding_size=NZ, layer_norm=True).double()
    b = HyperLSTM(I, H, hyper_size=HH, embedding_size=NZ, layer_norm=True, layer_norm_bias=False).double()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k in b.state_dict()})
    xs = torch.randn(6, 2, I, dtype=torch.double)
    torch.testing.assert_close(a(xs)[0], b(xs)[0])
    c = LSTM(I, H, layer_norm=True, layer_norm_bias=False).double()
    assert c.cells[0].gate_norm.bias is None
    for g, w in zip(c.cells[0](xs[0]), ref_lstm_step(c.cells[0], xs[0], *(torch.zeros(2, H).double(),) * 2)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kind", ["hyper", "lstm"])
def test_layer_norm_eps_reaches_every_norm_and_the_fused_path(kind):
    m = make(kind, num_layers=2, layer_norm=True, layer_norm_eps=1e-3)
    m = perturb_(m).double()
    norms = [mod for mod in m.modules() if hasattr(mod, "eps")]
    assert len(norms) == (8 if kind == "hyper" else 4) and all(n.eps == 1e-3 for n in norms)
    x = 0.01 * torch.randn(6, 2, I, dtype=torch.double)  # small pre-activations: eps matters
    ref_out, _ = ref_layers(m, x, hyper=kind == "hyper")
    out, _ = m(x)
    torch.testing.assert_close(out, ref_out)
    for cell in m.cells:
        cell.fused = False
    torch.testing.assert_close(m(x)[0], out)  # fused (covers eps) == eager
    default = make(kind, num_layers=2, layer_norm=True).double()
    default.load_state_dict(m.state_dict())
    assert not torch.allclose(default(x)[0], out)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        make(kind, layer_norm=True, layer_norm_eps=0.0)


def test_non_default_switches_run_the_eager_path():
    for kw in (dict(z_input="previous"), dict(layer_norm=True, layer_norm_bias=False)):
        m = HyperLSTM(I, H, hyper_size=HH, embedding_size=NZ, **kw)
        assert not m.cells[0].fused_supported
        out, _ = m(torch.randn(5, 2, I))
        assert "HyperLSTMFunction" not in type(out.grad_fn).__name__
    assert HyperLSTM(I, H, layer_norm=True, layer_norm_eps=1e-3).cells[0].fused_supported


def test_input_init_xavier_uniform_is_the_original_codes_and_changes_only_w_x():
    torch.manual_seed(22)
    paper = HyperLSTMCell(I, 8, hyper_size=HH, embedding_size=NZ)
    torch.manual_seed(22)
    orig = HyperLSTMCell(I, 8, hyper_size=HH, embedding_size=NZ, input_init="xavier_uniform")
    for cell in (orig, orig.hyper):
        w = cell.weight_ih
        bound = (6.0 / (w.size(0) + w.size(1))) ** 0.5  # TensorFlow's glorot_uniform on the whole matrix
        assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound
    for block in paper.weight_ih.chunk(4, 0):  # the paper: orthogonal per gate
        torch.testing.assert_close(block.T @ block, torch.eye(I), atol=1e-5, rtol=0)
    for block in orig.weight_hh.chunk(4, 0):  # W_h stays orthogonal under both
        torch.testing.assert_close(block.T @ block, torch.eye(8), atol=1e-5, rtol=0)
    assert [n for n, _ in paper.named_parameters()] == [n for n, _ in orig.named_parameters()]
    for name in ("scaling.z_bias", "scaling.bias"):
        torch.testing.assert_close(paper.get_parameter(name), orig.get_parameter(name))
    torch.testing.assert_close(paper.scaling.d_weight[:2], orig.scaling.d_weight[:2])
    with pytest.raises(ValueError, match="input_init"):
        HyperLSTMCell(I, H, input_init="uniform")


def test_hyper_recurrent_dropout_default_inherits_and_zero_turns_it_off():
    assert HyperLSTMCell(I, H, recurrent_dropout=0.3).hyper.recurrent_dropout == 0.3  # the documented default
    off = _cell(recurrent_dropout=0.5, hyper_recurrent_dropout=0.0).train()
    on = _cell(recurrent_dropout=0.5).train()
    assert off.recurrent_dropout == on.recurrent_dropout == 0.5 and off.hyper.recurrent_dropout == 0.0
    x, state = torch.randn(3, I, dtype=torch.double), _state()
    a, b = off(x, state), off(x, state)
    torch.testing.assert_close(a[2:], b[2:])     # the hyper LSTM is deterministic ...
    assert not torch.equal(a[1], b[1])           # ... while the main LSTM still drops its candidate
    a, b = on(x, state), on(x, state)
    assert not torch.equal(a[3], b[3])
    m = build_recurrent("hyperlstm", I, H, recurrent_dropout=0.2, hyper_recurrent_dropout=0.0, z_input="previous",
                        layer_norm_eps=1e-3, layer_norm_bias=False, input_init="xavier_uniform")
    c = m.cells[0]
    assert (c.hyper.recurrent_dropout, c.z_input, c.layer_norm_eps, c.layer_norm_bias, c.input_init) == (
        0.0, "previous", 1e-3, False, "xavier_uniform")


SWITCHES = dict(hyper_recurrent_dropout=0.0, z_input="previous", layer_norm_eps=1e-3, layer_norm_bias=False,
                input_init="xavier_uniform")


def _hyper_cells(module):
    return [m for m in module.modules() if isinstance(m, HyperLSTMCell)]


def _assert_switched(module):
    cells = _hyper_cells(module)
    assert cells
    for c in cells:
        assert (c.hyper.recurrent_dropout, c.z_input, c.layer_norm_eps, c.layer_norm_bias, c.input_init) == (
            0.0, "previous", 1e-3, False, "xavier_uniform")
        assert c.recurrent_dropout == 0.1  # the main rate is untouched


def test_every_model_that_builds_a_hyperlstm_exposes_the_switches():
    from hypernetworks.models.char_lm import CharLM
    from hypernetworks.models.handwriting import HandwritingMDN
    from hypernetworks.models.seq2seq import Seq2Seq
    from hypernetworks.tasks.handwriting import HandwritingTask
    from hypernetworks.tasks.language_model import LanguageModelTask
    from hypernetworks.tasks.translation import TranslationTask

    small = dict(hyper_size=4, recurrent_dropout=0.1)
    _assert_switched(CharLM(10, cell="ln-hyperlstm", hidden_size=6, embedding_size=2, **small, **SWITCHES))
    _assert_switched(HandwritingMDN("ln-hyperlstm", hidden_size=6, num_mixtures=2, embedding_size=2, **small,
                                    **SWITCHES))
    _assert_switched(Seq2Seq(20, embed_size=6, hidden_size=6, cell="ln-hyperlstm", hyper_embedding_size=2, **small,
                             **SWITCHES))
    # ... and through the tasks' constructor arguments (what a YAML recipe sets)
    _assert_switched(LanguageModelTask(cell="ln-hyperlstm", hidden_size=6, embedding_size=2, vocab=list("abc"),
                                       **small, **SWITCHES).net)
    _assert_switched(HandwritingTask("iam-ln-hyperlstm-900", model_overrides=dict(hidden_size=6, **small,
                                                                                  **SWITCHES)).model)
    _assert_switched(TranslationTask("multi30k-gnmt-ln-hyperlstm", model_vocab_size=20,
                                     model_args=dict(embed_size=6, hidden_size=6, **small, **SWITCHES)).net)
    # defaults: the package's (z from h_hat_t, torch's LayerNorm, paper's init, hyper rate = main rate)
    c = _hyper_cells(CharLM(10, cell="ln-hyperlstm", hidden_size=6, **small))[0]
    assert (c.hyper.recurrent_dropout, c.z_input, c.layer_norm_eps, c.layer_norm_bias, c.input_init) == (
        0.1, "current", 1e-5, True, "orthogonal")


# ---------------------------------------------------------------- the one-step Function (HyperLSTMCell.forward)
def _state_forms(B=3):
    g = torch.Generator().manual_seed(31)
    full = tuple(torch.randn(B, n, generator=g, dtype=torch.double, requires_grad=True) for n in (H, H, HH, HH))
    return {"none": (lambda: None, ()),
            "short": (lambda: full[:2], full[:2]),
            "packed": (lambda: (full[0], torch.cat(full[1:], -1)), full),
            "full": (lambda: full, full)}


def _one_step_path(monkeypatch, path: str) -> None:
    """The one-step Function as one library call each way ("one call": the kernels with torch's MKL),
    with the compiled step kernels called from Python ("kernels": what runs where torch has no MKL),
    or with PyTorch ops."""
    from hypernetworks.nn import _kernels, hyper_lstm
    if path == "torch ops":
        monkeypatch.setattr(hyper_lstm, "_step_kernels", lambda x: None)
        return
    if hyper_lstm._step_kernels(torch.zeros(1)) is None:
        pytest.skip("the compiled step kernels are not available here; the PyTorch-op variant still runs")
    if path == "kernels":
        monkeypatch.setitem(_kernels._state, "loops", False)
    elif _kernels.sequence_loops() is None:
        pytest.skip("this torch links no MKL, so one-call steps are off; the kernels variant still runs")


@pytest.mark.parametrize("path", ["one call", "kernels", "torch ops"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("form", ["none", "short", "packed", "full"])
def test_one_step_function_equals_eager_step(form, bias, path, monkeypatch):
    """The single-step Function gives the eager ops' outputs and gradients (every input, every
    parameter) to rounding, for every state form."""
    _one_step_path(monkeypatch, path)
    cell = _cell(bias=bias)
    make_hx, leaves = _state_forms()[form]
    x = torch.randn(3, I, dtype=torch.double, requires_grad=True)
    results = []
    for fused in (True, False):
        cell.fused = fused
        out = cell(x, make_hx())
        weights = [torch.linspace(-1, 1, o.numel(), dtype=torch.double).view_as(o) for o in out]
        wrt = [x, *leaves, *cell.parameters()]
        grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), wrt, allow_unused=True)
        results.append(([o.detach() for o in out], grads))
    (out_f, g_f), (out_e, g_e) = results
    assert len(out_f) == len(out_e) == (4 if form == "full" else 2)
    for a, b in zip(out_f, out_e):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_f, g_e):
        if a is None or b is None:  # unused: e.g. W_hat_hh without a hyper state; the other path says 0
            assert all(t is None or not t.any() for t in (a, b))
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["one call", "kernels", "torch ops"])
def test_one_step_function_unbatched_and_gradcheck(path, monkeypatch):
    _one_step_path(monkeypatch, path)
    cell = perturb_(HyperLSTMCell(3, 4, hyper_size=3, embedding_size=2)).double()
    x = torch.randn(3, dtype=torch.double)
    h, c = cell(x)
    cell.fused = False
    h_e, c_e = cell(x)
    cell.fused = True
    assert h.shape == (4,) and c.shape == (4 + 6,)
    torch.testing.assert_close((h, c), (h_e, c_e), rtol=1e-10, atol=1e-12)
    xb = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    state = [torch.randn(2, n, dtype=torch.double, requires_grad=True) for n in (4, 4 + 6)]
    params = list(cell.parameters())
    fn = lambda x, h, c, *ps: cell(x, (h, c))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (xb, *state, *params))
    # a graph of the gradient (double backward) recomputes the step with the eager ops
    assert torch.autograd.gradgradcheck(fn, (xb, *state, *params))


def test_one_step_function_sees_in_place_weight_changes():
    """Nothing is cached between calls: ``p.data`` writes (which bump no version counter) count."""
    cell = _cell()
    x, (h, c) = torch.randn(3, I, dtype=torch.double), _state()[:2]
    before = cell(x, (h, c))[0]
    cell.weight_hh.data.mul_(0.5)
    after = cell(x, (h, c))[0]
    cell.fused = False
    torch.testing.assert_close(after, cell(x, (h, c))[0], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(before, after)


def test_other_settings_keep_the_eager_step():
    """Layer norm, z from h_hat_{t-1}, recurrent dropout in training, autocast and torch.func
    transforms run the eager ops (the Function is not in the graph), with the same pair contract."""
    x, (h, c) = torch.randn(3, I, dtype=torch.double), _state()[:2]

    def fn_names(out):
        return type(out[0].grad_fn).__name__

    assert fn_names(_cell()(x.requires_grad_(), (h, c))) == "_HyperStepBackward"
    for cell in (_cell(layer_norm=True), _cell(z_input="previous"), _cell(recurrent_dropout=0.2).train()):
        out = cell(x, (h, c))
        assert len(out) == 2 and out[1].shape == (3, H + 2 * HH) and fn_names(out) != "_HyperStepBackward"
    cell32 = HyperLSTMCell(I, H, hyper_size=HH, embedding_size=NZ)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cell32(x.float(), (h.float(), c.float()))
    assert len(out) == 2 and fn_names(out) != "_HyperStepBackward"
    cell = _cell()
    ps = dict(cell.named_parameters())
    jac = torch.func.jacrev(lambda x: torch.func.functional_call(cell, ps, (x, (h, c)))[0])(x.detach())
    assert jac.shape == (3, H, 3, I)


def test_default_hyper_size_is_never_larger_than_the_cell():
    from hypernetworks.nn.hyper_lstm import default_hyper_size
    assert [default_hyper_size(n) for n in (1, 3, 4, 51, 128, 512, 1000, 2048)] == [1, 1, 1, 12, 32, 128, 128, 128]
    assert all(1 <= default_hyper_size(n) <= n for n in range(1, 700))
    assert HyperLSTMCell(I, 51).hyper_size == 12 and HyperRNNCell(I, 51).hyper_size == 12
    m = HyperLSTM(I, 1000, num_layers=2)
    assert m.hyper_size == 128 and all(c.hyper_size == 128 for c in m.cells)
    assert HyperLSTM(I, 2).hyper_size == 1 and HyperRNN(I, 40).hyper_size == 10
    assert HyperLSTMCell(I, 8, hyper_size=128).hyper_size == 128  # an explicit size is kept, even a large one
    # the paper's recipes state their sizes: the experiment factory and the models keep 128
    assert build_recurrent("hyperlstm", I, 1000).cells[0].hyper_size == 128
    assert build_recurrent("hyperlstm", I, 64).cells[0].hyper_size == 128


@pytest.mark.parametrize("path", ["one call", "kernels", "torch ops"])
def test_one_step_function_float32_matches_float64(path, monkeypatch):
    _one_step_path(monkeypatch, path)
    cell = _cell()
    x, (h, c) = torch.randn(3, I, dtype=torch.double), _state()[:2]
    want = cell(x, (h, c))
    got = cell.float()(x.float(), (h.float(), c.float()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_call_step_equals_the_kernel_step_loop_at_an_odd_size(dtype, monkeypatch):
    """The time-series example's loop (two stacked cells, hidden 51, hyper 16, batch 97, strided
    input columns) through the one-call step and through the Python-called kernels: the same outputs
    and parameter gradients (float32: to float32 rounding)."""
    from hypernetworks.nn import _kernels, hyper_lstm
    if hyper_lstm._step_kernels(torch.zeros(1)) is None or _kernels.sequence_loops() is None:
        pytest.skip("needs the compiled kernels and torch's MKL (the one-call step); other tests cover the rest")
    torch.manual_seed(0)
    cells = [HyperLSTMCell(1, 51, hyper_size=16).to(dtype), HyperLSTMCell(51, 51, hyper_size=16).to(dtype)]
    xs = torch.randn(97, 12, 3, dtype=dtype)[:, :, 1:2]  # strided: every third column

    def run(one_call: bool):
        monkeypatch.setitem(_kernels._state, "loops", one_call)
        for c in cells:
            c.zero_grad(set_to_none=True)
        h1 = c1 = h2 = c2 = torch.zeros(97, 51, dtype=dtype)
        outs = []
        for t in range(xs.size(1)):
            h1, c1 = cells[0](xs[:, t], (h1, c1))
            h2, c2 = cells[1](h1, (h2, c2))
            outs.append(h2)
        torch.stack(outs).pow(2).sum().backward()
        return [torch.stack(outs).detach()] + [p.grad for c in cells for p in c.parameters()]

    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)

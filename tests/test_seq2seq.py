"""The GNMT-style encoder-decoder: masks, incremental decoding, greedy and beam search."""
from __future__ import annotations

import pytest
import torch

from hypernetworks import create_model, list_models
from hypernetworks.models.seq2seq import BOS_ID, EOS_ID, PAD_ID, Seq2Seq

V = 40


def _model(cell="lstm", attention="additive", input_feeding=False, **kw):
    torch.manual_seed(0)
    m = Seq2Seq(V, embed_size=12, hidden_size=16, encoder_layers=3, decoder_layers=3, cell=cell, attention=attention,
                input_feeding=input_feeding, dropout=0.0, hyper_size=8, hyper_embedding_size=4, **kw)
    return m.eval()


def _batch(lengths, extra_pad=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths) + extra_pad
    src = torch.full((len(lengths), S), PAD_ID)
    for b, n in enumerate(lengths):
        src[b, :n] = torch.randint(4, V, (n,), generator=g)
    return src, torch.tensor(lengths)


CASES = [("lstm", "additive", False), ("ln-lstm", "multiplicative", True), ("hyperlstm", "multiplicative", False),
         ("ln-hyperlstm", "additive", True)]


@pytest.mark.parametrize("cell,attention,feeding", CASES)
def test_outputs_do_not_depend_on_padding_length(cell, attention, feeding):
    m = _model(cell, attention, feeding)
    src, lengths = _batch([5, 2, 7])
    tgt = torch.randint(4, V, (3, 6), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = BOS_ID
    with torch.no_grad():
        ref = m(src, lengths, tgt)
        padded = torch.cat([src, torch.full((3, 9), PAD_ID)], dim=1)
        # garbage (non-pad ids) beyond each length must not leak in either: the mask is the length
        junk = padded.clone()
        junk[junk == PAD_ID] = 7
        assert torch.allclose(m(padded, lengths, tgt), ref, atol=1e-5)
        assert torch.allclose(m(junk, lengths, tgt), ref, atol=1e-5)
        # and a sentence's output does not depend on its batch neighbours
        alone = m(src[1:2, :2], lengths[1:2], tgt[1:2])
        assert torch.allclose(alone, ref[1:2], atol=1e-5)
        enc = m.encode(padded, lengths)
        assert enc.mask.sum(1).tolist() == [5, 2, 7]


@pytest.mark.parametrize("cell,attention,feeding", CASES)
def test_step_by_step_decoding_matches_teacher_forcing(cell, attention, feeding):
    # Decoding carries the recurrent state tuples ((h, c) or (h, c, h_hat, c_hat)) one token at a time.
    m = _model(cell, attention, feeding)
    src, lengths = _batch([4, 6])
    tgt = torch.randint(4, V, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(src, lengths, tgt)
        enc, state, steps = m.encode(src, lengths), None, []
        for t in range(tgt.size(1)):
            logits, state = m.decode(tgt[:, t:t + 1], enc, state)
            steps.append(logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    if cell.endswith("hyperlstm"):
        assert len(state[0][0]) == 4  # (h, c, h_hat, c_hat)


@pytest.mark.parametrize("cell", ["lstm", "ln-hyperlstm"])
def test_beam_one_equals_greedy(cell):
    m = _model(cell, input_feeding=cell == "lstm")
    src, lengths = _batch([3, 6, 1, 4], extra_pad=2)
    greedy = m.greedy(src, lengths, max_len=12)
    beam1 = m.beam_search(src, lengths, beam=1, max_len=12)
    assert greedy == beam1
    assert any(len(s) > 0 for s in greedy) and all(len(s) <= 12 for s in greedy)
    assert all(PAD_ID not in s and BOS_ID not in s and EOS_ID not in s for s in greedy)
    beam4 = m.beam_search(src, lengths, beam=4, max_len=12)
    assert len(beam4) == 4 and all(len(s) <= 12 for s in beam4)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy():
    m = _model("lstm")
    src, lengths = _batch([5, 3])

    def logprob(seqs):
        out = []
        for b, s in enumerate(seqs):
            tgt = torch.tensor([[BOS_ID, *s]])
            with torch.no_grad():
                lp = torch.log_softmax(m(src[b:b + 1], lengths[b:b + 1], tgt), -1)[0]
            out.append(float(sum(lp[t, tok] for t, tok in enumerate([*s, EOS_ID]))))
        return out

    # no length penalty: beam search maximises the same sum greedy approximates
    g = m.greedy(src, lengths, max_len=8)
    b = m.beam_search(src, lengths, beam=6, max_len=8, length_penalty=0.0)
    if all(len(s) < 8 for s in g + b):  # both ended with EOS (no forced stop at the cap)
        for lb, lg in zip(logprob(b), logprob(g)):
            assert lb >= lg - 1e-4


def test_registry_and_argument_errors():
    names = list_models("*gnmt*")
    for cell in ("lstm", "ln-lstm", "hyperlstm", "ln-hyperlstm"):
        assert f"wmt14-gnmt-{cell}" in names and f"multi30k-gnmt-{cell}" in names
    small = create_model("multi30k-gnmt-ln-hyperlstm", vocab_size=50, embed_size=8, hidden_size=8, hyper_size=4,
                         hyper_embedding_size=2)
    assert small.cell == "ln-hyperlstm"
    with pytest.raises(ValueError, match="cell"):
        Seq2Seq(V, cell="gru")
    with pytest.raises(ValueError, match="attention"):
        Seq2Seq(V, attention="dot-product")
    with pytest.raises(ValueError, match="hidden_size"):
        Seq2Seq(V, hidden_size=15)
    with pytest.raises(ValueError, match="beam"):
        _model().beam_search(*_batch([2]), beam=0)

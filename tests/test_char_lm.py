"""Char LM model, registry rows, sampling, demo contract, and a short real PTB run."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import require_file
from hypernetworks.models.char_lm import PAPER_MODELS, PAPER_PARAMS_M, CharLM
from hypernetworks.models.registry import create_model, list_models
from hypernetworks.tasks.language_model import LanguageModelTask


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_every_paper_row_is_registered():
    assert set(PAPER_MODELS) <= set(list_models("ptb-*") + list_models("enwik8-*"))


def formula(V: int, H: int, L: int = 1, Nh: int = 0, Nz: int = 0, ln: bool = False, ln_bias: bool = True) -> int:
    """The parameter count written out from the architecture (one-hot input, softmax decoder)."""
    norm = (2 if ln_bias else 1) if ln else 0  # gain (and bias) vectors per normalised feature
    n = H * V + V  # decoder
    for k in range(L):
        n_in = V if k == 0 else H
        n += 4 * H * (n_in + H) + 4 * H + norm * 5 * H  # W_x, W_h, b_0, 4 gate norms + cell norm
        if Nh:
            n += 4 * Nh * (H + n_in + Nh + 1) + norm * 5 * Nh  # hyper LSTM on [h; x]
            n += 4 * (3 * Nh * Nz + 2 * Nz + 3 * Nz * H)       # z_h, z_x (with bias), z_b; d_h, d_x, d_b
    return n


ROWS = {  # name -> the formula's arguments
    "ptb-lstm-1000": dict(V=50, H=1000), "ptb-lstm-1250": dict(V=50, H=1250),
    "ptb-2layer-lstm-1000": dict(V=50, H=1000, L=2), "ptb-ln-lstm-1000": dict(V=50, H=1000, ln=True),
    "ptb-hyperlstm": dict(V=50, H=1000, Nh=128, Nz=4), "ptb-ln-hyperlstm": dict(V=50, H=1000, Nh=128, Nz=4, ln=True),
    "ptb-ln-hyperlstm-nz16": dict(V=50, H=1000, Nh=128, Nz=16, ln=True),
    "ptb-2layer-ln-hyperlstm": dict(V=50, H=1000, L=2, Nh=128, Nz=16, ln=True),
    "enwik8-lstm-1800": dict(V=205, H=1800), "enwik8-ln-lstm-1800": dict(V=205, H=1800, ln=True),
    "enwik8-hyperlstm-1800": dict(V=205, H=1800, Nh=256, Nz=64),
    "enwik8-ln-hyperlstm-1800": dict(V=205, H=1800, Nh=256, Nz=64, ln=True),
    "enwik8-ln-hyperlstm-2048": dict(V=205, H=2048, Nh=512, Nz=64, ln=True),
}
# Rows whose count differs from the paper's by more than its rounding (0.005M): our exact count and
# why (docs/char_lm.md, "Parameter counts", has the arithmetic).
NOT_THE_PAPERS = {
    # LayerNorm with gain and bias adds 18,000; the original code's gain-only norms add 9,000 -> 14.82M.
    "enwik8-ln-lstm-1800": 14_830_405,
    # Only N_z 14 or hyper size 123-125 (values the paper never uses) would give 5.06M, with either
    # LayerNorm; the paper's own 2-layer row (14.41M) implies
    # this model has 5.086M (its first layer is this model, its second adds 9,322,032).
    "ptb-ln-hyperlstm-nz16": 5_085_682,
    # The paper's LN row is 0.07M above its plain HyperLSTM row; LayerNorm adds 20,560 (10,280 gain-only).
    "enwik8-ln-hyperlstm-1800": 18_728_773,
}


def test_every_row_is_in_the_formula_table():
    assert set(ROWS) == set(PAPER_MODELS)


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_paper_parameter_counts(name):
    with torch.device("meta"):
        m = create_model(name)
    n = _count(m)
    assert n == formula(**ROWS[name])  # exactly the architecture written out
    paper = PAPER_PARAMS_M[name] * 1e6
    if name in NOT_THE_PAPERS:
        assert n == NOT_THE_PAPERS[name] and abs(n - paper) > 5000
        assert abs(n - paper) / paper < 0.0051, (name, n)  # all within 0.51% (nz16: +0.507%)
    else:
        assert abs(n - paper) <= 5000, (name, n)  # equal to the paper's count at its rounding


def test_the_explanations_of_the_differences():
    # gain-only LayerNorm (the original code's) gives the paper's 14.82M for the LN LSTM 1800 ...
    assert round(formula(V=205, H=1800, ln=True, ln_bias=False) / 1e6, 2) == 14.82
    # ... but not the 0.07M of the LN HyperLSTM 1800 (18.72M), nor 26.54M for the 2048 row (26.53M)
    assert round(formula(V=205, H=1800, Nh=256, Nz=64, ln=True, ln_bias=False) / 1e6, 2) == 18.72
    assert round(formula(V=205, H=2048, Nh=512, Nz=64, ln=True, ln_bias=False) / 1e6, 2) == 26.53
    # the 2-layer LN HyperLSTM: N_z 4 gives 14.08M, N_z 16 the paper's 14.41M
    assert round(formula(V=50, H=1000, L=2, Nh=128, Nz=4, ln=True) / 1e6, 2) == 14.08
    # its first layer is the N_z 16 model: with that model at the paper's 5.06M it could not reach 14.41M
    second_layer = formula(V=50, H=1000, L=2, Nh=128, Nz=16, ln=True) - formula(V=50, H=1000, Nh=128, Nz=16, ln=True)
    assert second_layer == 9_322_032 and round((5.065e6 + second_layer) / 1e6, 2) < 14.41
    # no integer N_z gives 5.06M for the single-layer model (13,544 parameters per unit of N_z)
    assert [nz for nz in range(1, 65) if round(formula(V=50, H=1000, Nh=128, Nz=nz, ln=True) / 1e6, 2) == 5.06
            or round(formula(V=50, H=1000, Nh=128, Nz=nz, ln=True, ln_bias=False) / 1e6, 2) == 5.06] == [14]


def test_lstm_1000_count_is_the_formula_and_vocab_overridable():
    with torch.device("meta"):
        assert _count(create_model("ptb-lstm-1000")) == 4 * 1000 * (1000 + 50) + 4 * 1000 + 1000 * 50 + 50
        m = create_model("ptb-lstm-1000", vocab_size=60)
    assert m.decoder.out_features == 60 and _count(m) == 4 * 1000 * 1060 + 4000 + 1000 * 60 + 60


@pytest.mark.parametrize("kw,name", [(dict(input_dropout=1.0), "input_dropout"),
                                     (dict(recurrent_dropout=-0.1), "recurrent_dropout"),
                                     (dict(vocab_size=1), "vocab_size"), (dict(cell="gru"), "cell")])
def test_bad_model_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        CharLM(**{"vocab_size": 10, "hidden_size": 8, **kw})


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="lr"):
        LanguageModelTask(lr=0.0)
    with pytest.raises(ValueError, match="hidden_size"):
        LanguageModelTask(hidden_size=0)


VOCAB = list("abcdefgh ")


@pytest.mark.parametrize("cell", ["lstm", "ln-hyperlstm"])
def test_sampling_deterministic_under_seed(cell):
    torch.manual_seed(0)
    task = LanguageModelTask(cell=cell, hidden_size=16, hyper_size=8, vocab=VOCAB)
    a = task.sample(60, temperature=1.0, seed=3, prime="abc ")
    assert a == task.sample(60, temperature=1.0, seed=3, prime="abc ")
    assert a != task.sample(60, temperature=1.0, seed=4, prime="abc ")
    assert len(a) == 60 and set(a) <= set(VOCAB)
    # a very low temperature is (nearly) greedy: the same whatever the seed
    assert task.sample(30, temperature=1e-4, seed=1, prime="ab") == task.sample(30, temperature=1e-4, seed=2, prime="ab")
    with pytest.raises(ValueError, match="temperature"):
        task.sample(5, temperature=0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        task.sample(5, prime="xyz")


def test_demo_generate_contract():
    torch.manual_seed(0)
    hyper = LanguageModelTask(cell="hyperlstm", hidden_size=16, hyper_size=8, vocab=VOCAB)
    with torch.no_grad():  # at initialisation z (so d) is constant: move off it, as training does
        for p in hyper.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = hyper.demo_generate(length=25, temperature=0.8, seed=1, prime="ab")
    assert out["kind"] == "text" and len(out["steps"]) == len(out["intensity"]) == 25
    assert all(isinstance(s, str) for s in out["steps"])
    assert all(len(row) == 4 and all(isinstance(v, float) for v in row) for row in out["intensity"])
    assert sum(map(sum, out["intensity"])) > 0
    assert out == hyper.demo_generate(length=25, temperature=0.8, seed=1, prime="ab")
    lstm = LanguageModelTask(cell="lstm", hidden_size=16, vocab=VOCAB).demo_generate(length=10)
    assert lstm["intensity"] == [[0.0] * 4] * 10


def test_short_real_ptb_run_lowers_valid_bpc(shared_data, tmp_path):
    from hypernetworks.data.text import PTBCharDataModule
    from hypernetworks.training import make_trainer

    require_file(shared_data / "ptb" / "ptb.char.train.txt")
    torch.manual_seed(0)
    dm = PTBCharDataModule(root=str(shared_data / "ptb"), batch_size=16, seq_len=50, eval_batch_size=128)
    task = LanguageModelTask(cell="lstm", hidden_size=32, lr=1e-2)
    trainer = make_trainer(tmp_path, LanguageModelTask, max_steps=40, limit_val_batches=8,
                           val_check_interval=40, enable_progress_bar=False, enable_model_summary=False,
                           logger=False, num_sanity_val_steps=0)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]["val_bpc"]
    assert before == pytest.approx(math.log2(50), abs=0.2)  # an untrained model is near uniform
    trainer.fit(task, datamodule=dm)
    after = trainer.callback_metrics["val_bpc"].item()
    assert after < before - 0.7

"""Mixed precision (torch.autocast, Lightning's "bf16-mixed") and torch.compile of the recurrent layers, on CPU."""
from __future__ import annotations

import os

import pytest
import torch

from hypernetworks.nn import LSTM, HyperLSTM, HyperLSTMCell, HyperRNN
from hypernetworks.nn import _fused

I, H, HH, NZ, T, B = 6, 16, 8, 4, 12, 3
BF16 = torch.bfloat16




LAYERS = {
    "hyperlstm": lambda: HyperLSTM(I, H, hyper_size=HH, embedding_size=NZ),
    "ln-hyperlstm": lambda: HyperLSTM(I, H, hyper_size=HH, embedding_size=NZ, layer_norm=True),
    "ln-hyperlstm-2layer-bidir": lambda: HyperLSTM(I, H, hyper_size=HH, embedding_size=NZ, layer_norm=True,
                                                   num_layers=2, bidirectional=True),
    "ln-lstm": lambda: LSTM(I, H, layer_norm=True),
    "ln-lstm-2layer": lambda: LSTM(I, H, layer_norm=True, num_layers=2),
    "lstm": lambda: LSTM(I, H),
    "hyperrnn": lambda: HyperRNN(I, H, hyper_size=HH, embedding_size=NZ),
}


def make(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = LAYERS[kind]()
    with torch.no_grad():  # away from the special initial values (d = 0.1, zero dynamic bias)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def run(m, x, amp: bool, fused: bool = True, dtype=BF16):
    """Output, state and the gradients of a loss touching every output and state, under autocast or not."""
    for cell in [*m.cells, *getattr(m, "cells_reverse", [])]:
        cell.fused = fused
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=amp):
        out, state = m(x)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    loss = (out.float() * weights).sum() + sum(s.float().pow(2).sum() for s in state)
    loss.backward()
    return out, state, [x.grad] + [p.grad for p in m.parameters()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_bf16_autocast_matches_fp32(kind, step_path):
    """Forward and backward under CPU bf16 autocast: finite, close to float32 (bf16 keeps ~3 significant
    digits: relative error well under 3% on outputs and 10% on every gradient), and the fused path close
    to the eager per-step path under the same autocast."""
    m = make(kind)
    x = torch.randn(T, B, I)
    out32, st32, g32 = run(m, x, amp=False)
    out16, st16, g16 = run(m, x, amp=True)
    assert all(g is not None and torch.isfinite(g).all() for g in g16)
    assert rel(out16, out32) < 0.03
    for s, t in zip(st16, st32, strict=True):
        assert rel(s, t) < 0.03
    for g, h in zip(g16, g32, strict=True):
        assert rel(g, h) < 0.1
    out_e, _, g_e = run(m, x, amp=True, fused=False)
    assert rel(out16, out_e) < 0.03
    for g, h in zip(g16, g_e, strict=True):
        assert rel(g, h) < 0.1


@pytest.mark.parametrize("kind", ["hyperlstm", "ln-hyperlstm", "ln-lstm"])
def test_fused_layers_keep_fp32_state_and_run_products_in_bf16(kind, step_path, monkeypatch):
    """Under autocast the fused paths return float32 outputs and states (cell state, norms and the
    nonlinearities stay float32) while every matrix product they run, forward and backward, takes
    bf16 operands."""
    seen = []

    def spy(name):
        real = getattr(_fused, name)

        def wrapped(*args, **kwargs):
            seen.append((name, tuple(a.dtype for a in args if isinstance(a, torch.Tensor))))
            return real(*args, **kwargs)
        return wrapped

    for name in ("_linear", "_mm", "_addmm", "_addmm_", "_gemm"):
        monkeypatch.setattr(_fused, name, spy(name))
    m = make(kind)
    out, state, grads = run(m, torch.randn(T, B, I), amp=True)
    assert out.dtype == torch.float32 and all(s.dtype == torch.float32 for s in state)
    assert seen, "the fused path ran no product"
    # the weight operand (the last tensor of _linear/_mm/_addmm/_addmm_) is bf16; _gemm casts both to its dtype arg
    for name, dtypes in seen:
        if name != "_gemm":
            assert dtypes[-1] == BF16, (name, dtypes)
    assert any(name == "_gemm" for name, _ in seen)


def test_autocast_packed_and_dropout(step_path):
    """A PackedSequence batch and recurrent dropout in training mode under bf16 autocast."""
    m = HyperLSTM(I, H, hyper_size=HH, embedding_size=NZ, layer_norm=True, recurrent_dropout=0.2).train()
    x = torch.randn(T, B, I)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([T, T - 3, 5]), enforce_sorted=False)
    with torch.autocast("cpu", dtype=BF16):
        out, state = m(packed)
    (out.data.float().sum() + sum(s.sum() for s in state)).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_autocast_fp16_on_cpu(step_path):
    """The same code path serves fp16 (CUDA's usual autocast dtype); CPU autocast takes float16 too."""
    m = make("ln-hyperlstm")
    x = torch.randn(T, B, I)
    out32, _, _ = run(m, x, amp=False)
    out16, _, g16 = run(m, x, amp=True, dtype=torch.float16)
    assert all(torch.isfinite(g).all() for g in g16)
    assert rel(out16, out32) < 0.01


def test_autocast_cell_and_sampling_step():
    """HyperLSTMCell under autocast: a training step (eager) and a no-grad sampling step (fused, T=1)."""
    torch.manual_seed(0)
    cell = HyperLSTMCell(I, H, hyper_size=HH, embedding_size=NZ, layer_norm=True)
    x = torch.randn(B, I)
    hx = tuple(torch.zeros(B, n) for n in (H, H, HH, HH))  # the full state in, the full state out
    ref = cell(x, hx)
    with torch.autocast("cpu", dtype=BF16):
        h, c, hh, ch = cell(x, hx)
    (h.float().sum() + c.float().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in cell.parameters() if p.grad is not None)
    assert rel(h, ref[0]) < 0.03
    m = HyperLSTM(I, H, hyper_size=HH, embedding_size=NZ)
    with torch.no_grad():
        want, _ = m(x.unsqueeze(0))
        with torch.autocast("cpu", dtype=BF16):
            got, state = m(x.unsqueeze(0))
            got2, _ = m(x.unsqueeze(0), state)  # the state it returned goes back in
    assert got.dtype == torch.float32 and rel(got, want) < 0.03 and torch.isfinite(got2).all()


def test_lightning_bf16_mixed_fit(tmp_path):
    """A few steps of a tiny char-LM (LN HyperLSTM) with Lightning's precision="bf16-mixed" on CPU."""
    import lightning.pytorch as pl

    from hypernetworks.data.text import PTBCharDataModule
    from hypernetworks.tasks.language_model import LanguageModelTask

    text = "the quick brown fox jumps over the lazy dog " * 40  # in Mikolov's format: one token per char
    for split in ("train", "valid", "test"):
        (tmp_path / f"ptb.char.{split}.txt").write_text(" ".join("_" if ch == " " else ch for ch in text) + " \n")
    torch.manual_seed(0)
    dm = PTBCharDataModule(root=str(tmp_path), batch_size=4, seq_len=16, eval_batch_size=4)
    task = LanguageModelTask(cell="ln-hyperlstm", hidden_size=16, hyper_size=8, embedding_size=4,
                             recurrent_dropout=0.1, lr=1e-2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=4, limit_val_batches=2,
                         val_check_interval=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 4
    bpc = trainer.callback_metrics["val_bpc"]
    assert torch.isfinite(bpc) and 0 < bpc.item() < 10
    assert all(torch.isfinite(p).all() for p in task.parameters())


def _inductor_works() -> str | None:
    """None when torch.compile (inductor) can compile a trivial CPU function here, else why not."""
    try:
        torch._dynamo.reset()
        f = torch.compile(lambda t: torch.sin(t) * 2 + 1)
        x = torch.randn(8)
        torch.testing.assert_close(f(x), torch.sin(x) * 2 + 1)
        return None
    except Exception as e:  # no C++ compiler, missing headers, unsupported platform
        return f"torch.compile (inductor) cannot compile on this machine: {type(e).__name__}: {str(e)[:300]}"


def test_torch_compile_matches_eager():
    """torch.compile of a model holding LN HyperLSTM and LN LSTM layers: forward and backward run and equal
    eager (the recurrent layers run as opaque eager calls between the compiled parts), in float32 and
    under bf16 autocast."""
    why = _inductor_works()
    if why:
        pytest.skip(why)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, I)
            self.rnn = HyperLSTM(I, H, hyper_size=HH, embedding_size=NZ, layer_norm=True)
            self.rnn2 = LSTM(H, H, layer_norm=True)
            self.head = torch.nn.Linear(H, 11)

        def forward(self, ids):
            y, _ = self.rnn(self.emb(ids))
            y, _ = self.rnn2(torch.relu(y))
            return self.head(y)

    torch.manual_seed(0)
    model = Model()
    ids = torch.randint(0, 11, (T, B))
    compiled = torch.compile(model)

    def results(amp: bool):
        got = []
        for fn in (model, compiled):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=BF16, enabled=amp):
                out = fn(ids)
            torch.nn.functional.cross_entropy(out.view(-1, 11).float(), ids.view(-1)).backward()
            got.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        return got

    (o1, g1), (o2, g2) = results(amp=False)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g2, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and under bf16 autocast (Lightning's bf16-mixed with a compiled model): the compiled parts may round
    # differently from eager, so bf16-sized tolerances
    (o1, g1), (o2, g2) = results(amp=True)
    assert rel(o2, o1) < 0.02
    for a, b in zip(g2, g1, strict=True):
        assert torch.isfinite(a).all() and rel(a, b) < 0.05


def test_importing_the_layers_does_not_load_dynamo():
    """The per-layer compiler.disable is applied lazily: ``import hypernetworks.nn`` stays free of
    torch._dynamo (about a second of import time)."""
    import subprocess
    import sys

    code = "import sys, hypernetworks.nn; print('torch._dynamo' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "False"


TRITON_AMP_CHILD = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from hypernetworks.nn import HyperLSTM, LSTM, _fused
torch.manual_seed(0)
worst = 0.0
for m in (HyperLSTM(6, 16, hyper_size=8, embedding_size=4, layer_norm=True, recurrent_dropout=0.2),
          HyperLSTM(6, 16, hyper_size=8, embedding_size=4), LSTM(6, 16, layer_norm=True)):
    x = torch.randn(7, 3, 6)
    runs = []
    for triton_on in (True, False):
        _fused._TRITON_ON_CPU = triton_on
        torch.manual_seed(1)
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, state = m(x)
        assert out.dtype == torch.float32
        (out.sum() + sum(s.pow(2).sum() for s in state)).backward()
        runs.append([out.detach()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*runs):
        assert torch.isfinite(a).all()
        worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-12)).item())
print(worst)
"""


def test_bf16_autocast_with_the_triton_step_kernels():
    """What CUDA runs under autocast: the fused paths with the Triton step kernels (here in Triton's CPU
    interpreter, in a child process) around low-precision products, against the same autocast run with
    PyTorch ops (both round the products to bf16 alike; the kernels' float32 math differs in the last bits)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed here (it comes with CUDA builds of torch, or the test extra on "
                    "Linux x86_64); the PyTorch-op variants of the autocast tests still run")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HYPERNETWORKS_TRITON": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", TRITON_AMP_CHILD], capture_output=True, text=True, timeout=600,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-3  # measured 4e-7

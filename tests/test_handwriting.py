"""Graves' MDN over recurrent cells, the handwriting task, sampling, rendering and the command."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hypernetworks import create_model, list_models
from hypernetworks.models.handwriting import PAPER_SIZES, HandwritingMDN, MDNParams, mdn_nll, sample_mdn
from hypernetworks.tasks.handwriting import HandwritingTask
from hypernetworks.viz.handwriting import save_png, save_svg, strokes_to_svg
from tests.conftest import require_file

TINY = {"hidden_size": 12, "hyper_size": 6, "embedding_size": 2, "num_mixtures": 3}


def _numpy_nll(logit_pi, mu, sigma, rho, eos_logit, x):
    """Graves (2013) eqs. 23-26 written out for one step, directly."""
    pi = np.exp(logit_pi - logit_pi.max())
    pi /= pi.sum()
    total = 0.0
    for j in range(len(pi)):
        z1, z2 = (x[0] - mu[j, 0]) / sigma[j, 0], (x[1] - mu[j, 1]) / sigma[j, 1]
        Z = z1**2 + z2**2 - 2 * rho[j] * z1 * z2
        dens = np.exp(-Z / (2 * (1 - rho[j] ** 2))) / (2 * np.pi * sigma[j, 0] * sigma[j, 1] * np.sqrt(1 - rho[j] ** 2))
        total += pi[j] * dens
    e = 1 / (1 + np.exp(-eos_logit))
    return -np.log(total) - np.log(e if x[2] == 1 else 1 - e)


def test_mdn_loss_matches_numpy():
    g = torch.Generator().manual_seed(0)
    B, M = 5, 4
    p = MDNParams(torch.randn(B, M, generator=g, dtype=torch.float64), torch.randn(B, M, 2, generator=g, dtype=torch.float64),
                  0.5 * torch.randn(B, M, 2, generator=g, dtype=torch.float64),
                  torch.tanh(torch.randn(B, M, generator=g, dtype=torch.float64)),
                  torch.randn(B, generator=g, dtype=torch.float64))
    x = torch.cat([torch.randn(B, 2, generator=g, dtype=torch.float64), torch.tensor([[0.], [1.], [0.], [1.], [1.]])], 1)
    got = mdn_nll(p, x)
    for b in range(B):
        ref = _numpy_nll(p.logit_pi[b].numpy(), p.mu[b].numpy(), p.log_sigma[b].exp().numpy(), p.rho[b].numpy(),
                         p.eos_logit[b].item(), x[b].numpy())
        assert math.isclose(got[b].item(), ref, rel_tol=1e-9, abs_tol=1e-9)


def test_registry_sizes_match_the_paper():
    assert set(PAPER_SIZES) <= set(list_models("iam-*"))
    for name, (_, _, _, paper) in PAPER_SIZES.items():
        with torch.device("meta"):  # counts only: skip the (slow) orthogonal initialisation
            n = sum(p.numel() for p in create_model(name).parameters())
        assert abs(n - paper) / paper < 0.005, (name, n, paper)


def test_forward_shapes_and_bad_args():
    m = HandwritingMDN("ln-hyperlstm", **TINY)
    p, state = m(torch.zeros(2, 7, 3))
    assert p.logit_pi.shape == (2, 7, 3) and p.mu.shape == (2, 7, 3, 2) and p.eos_logit.shape == (2, 7)
    assert p.rho.abs().max() < 1 and len(state) == 4
    with pytest.raises(ValueError, match="cell"):
        HandwritingMDN("gru", **TINY)
    with pytest.raises(ValueError, match="num_mixtures"):
        HandwritingMDN("lstm", hidden_size=4, num_mixtures=0)
    with pytest.raises(ValueError, match="bias"):
        sample_mdn(MDNParams(*(t[:, 0] for t in p)), bias=-1)


def _randomise(task: HandwritingTask, seed: int = 0) -> HandwritingTask:
    # a fresh HyperLSTM's hyper projections start at zero, so nothing would change per step
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in task.parameters():
            prm.copy_(0.3 * torch.randn(prm.shape, generator=g))
    return task


def test_sampling_is_deterministic_under_seed():
    task = _randomise(HandwritingTask("iam-hyperlstm-900", model_overrides=TINY))
    task.offset_mean.fill_(3.0)
    task.offset_std.fill_(20.0)
    torch.manual_seed(123)
    a, ia = task.generate(30, seed=7, activity=True)
    torch.manual_seed(456)  # the global RNG must not matter
    b, ib = task.generate(30, seed=7, activity=True)
    c, _ = task.generate(30, seed=8)
    assert torch.equal(a, b) and torch.equal(ia, ib) and not torch.equal(a, c)
    assert set(a[:, 2].tolist()) <= {0.0, 1.0}
    assert ia.shape == (30, 4) and ia[1:].sum() > 0
    # a high bias makes steps tighter (Graves' biased sampling)
    spread = lambda s: s[:, :2].std().item()  # noqa: E731
    assert spread(task.generate(200, bias=5.0, seed=1)[0]) < spread(task.generate(200, bias=0.0, seed=1)[0])


def test_demo_generate_contract():
    for name, hyper in (("iam-hyperlstm-900", True), ("iam-lstm-900", False)):
        task = _randomise(HandwritingTask(name, model_overrides=TINY))
        out = task.demo_generate(length=25, temperature=0.8, seed=3, prime="ignored")
        assert json.loads(json.dumps(out)) == out
        assert out["kind"] == "strokes" and len(out["steps"]) == 25 and len(out["intensity"]) == 25
        assert all(len(s) == 3 and s[2] in (0, 1) for s in out["steps"])
        assert all(len(i) == 4 for i in out["intensity"])
        assert (sum(map(sum, out["intensity"])) > 0) == hyper  # all zeros for a plain LSTM
        assert out == task.demo_generate(length=25, temperature=0.8, seed=3)
        with pytest.raises(ValueError, match="temperature"):
            task.demo_generate(temperature=0)


def test_tiny_training_lowers_loss(shared_data):
    from hypernetworks.data.strokes import IAMOnDBDataModule

    dm = IAMOnDBDataModule(str(require_file(shared_data / "iam_ondb/iam_ondb_linestrokes.npz")), batch_size=8,
                           max_lines=8, max_val_lines=4, max_len=40, scale_augment=0.0)
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    task = HandwritingTask("iam-hyperlstm-900", model_overrides=TINY, lr=1e-2)
    opt = task.configure_optimizers()
    losses = []
    for _ in range(15):
        seq, _ = task.sequence_nll(batch)
        loss = seq.sum() / batch["mask"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_fit_checkpoint_load_task_and_command(tmp_path, shared_data):
    from hypernetworks.commands.handwriting import main
    from hypernetworks.training import load_task, run_cli

    npz = require_file(shared_data / "iam_ondb/iam_ondb_linestrokes.npz")
    run_cli(["fit", "--config", "configs/iam-hyperlstm-cpu.yaml", "--runs_root", str(tmp_path), "--run_name", "t",
             "--model.model_overrides", json.dumps(TINY), "--data.path", str(npz), "--data.max_lines", "8",
             "--data.max_val_lines", "4", "--data.max_len", "20", "--data.batch_size", "4",
             "--trainer.max_steps", "2", "--trainer.logger", "false"])
    ckpt = tmp_path / "t" / "checkpoints" / "last.ckpt"
    task = load_task(ckpt)
    assert isinstance(task, HandwritingTask)
    assert 30 < task.offset_std.min() < 50  # training-split statistics travelled in the checkpoint
    assert task.demo_generate(length=10, seed=1) == load_task(ckpt).demo_generate(length=10, seed=1)
    assert main([str(ckpt), "--out", str(tmp_path / "hw"), "--length", "20", "--gates", "--num", "2"]) == 0
    svg = (tmp_path / "hw-1.svg").read_text()
    assert svg.startswith("<svg") and "<line" in svg
    assert (tmp_path / "hw-0.png").read_bytes()[:4] == b"\x89PNG"


def test_rendering(tmp_path):
    steps = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 1], [50, 0, 0], [5, 5, 1]], float)
    svg = strokes_to_svg(steps)
    assert svg.count("M") == 2 and svg.count("L") == 3  # two strokes, pen lifted between them
    inten = np.abs(np.random.default_rng(0).normal(size=(5, 4)))
    assert strokes_to_svg(steps, inten).count("<line") == 3
    with pytest.raises(ValueError, match="intensity"):
        strokes_to_svg(steps, np.ones((4, 4)))
    with pytest.raises(ValueError, match="steps"):
        strokes_to_svg(np.ones((3, 2)))
    assert save_png(steps, tmp_path / "a.png", inten).stat().st_size > 1000
    assert save_svg(steps, tmp_path / "a.svg").read_text().endswith("</svg>")

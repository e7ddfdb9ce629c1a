"""End to end on real MNIST: a tiny training run lowers the loss; checkpoint, reload, kernel pictures,
the recipes, and the classification task's options."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO, require_file
from hypernetworks.commands import kernels as kernels_cmd
from hypernetworks.data.images import MNISTDataModule
from hypernetworks.nn.static import TiledWeight
from hypernetworks.tasks.classification import ImageClassifier
from hypernetworks.training import load_task, make_trainer, run_cli

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("mnist-*.yaml")) + \
    sorted(p.name for p in (REPO / "configs").glob("cifar10-*.yaml") if "-channels-" not in p.name)
# (the cifar10-channels-* stand-in recipes build ViTs through ChannelClassifier: tests/test_channels.py)


@pytest.fixture(scope="module")
def mnist_dir(shared_data):
    d = shared_data / "mnist"
    require_file(d / "t10k-images-idx3-ubyte.gz")
    return d


def test_tiny_training_run_lowers_the_loss_then_reloads_and_draws(mnist_dir, tmp_path):
    torch.manual_seed(0)
    dm = MNISTDataModule(root=str(mnist_dir), batch_size=50, val_size=500)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    task = ImageClassifier(model="mnist-hyper", lr=3e-3)
    with torch.no_grad():
        before = F.cross_entropy(task(x), y).item()
    trainer = make_trainer(tmp_path / "run", ImageClassifier, max_steps=40, val_check_interval=40,
                           limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                           accelerator="cpu")
    trainer.fit(task, datamodule=dm)
    task.eval()
    with torch.no_grad():
        after = F.cross_entropy(task(x), y).item()
    assert after < 0.5 * before, (before, after)
    assert trainer.callback_metrics["val_acc"] > 0.5

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    loaded = load_task(ckpt)
    assert isinstance(loaded, ImageClassifier) and isinstance(loaded.model.conv2.parametrizations.weight[0], TiledWeight)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), task(x))

    png = tmp_path / "k.png"
    assert kernels_cmd.main(["--checkpoint", str(ckpt), "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 200
    with pytest.raises(SystemExit):
        kernels_cmd.main(["--checkpoint", str(ckpt), "--out", str(png), "--layers", "5"])
    with pytest.raises(SystemExit):
        kernels_cmd.main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(png)])


@pytest.fixture
def no_argv(monkeypatch):  # LightningCLI warns when pytest's own arguments are in sys.argv
    monkeypatch.setattr(sys, "argv", ["hypernetworks"])


def test_cpu_recipe_runs_through_the_training_entry_point(mnist_dir, tmp_path, no_argv):
    run_cli(["fit", "--config", str(REPO / "configs" / "mnist-hyper-cpu.yaml"), "--trainer.max_steps", "3",
             "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
             "--data.root", str(mnist_dir), "--runs_root", str(tmp_path)])
    ckpt = tmp_path / "mnist-hyper-cpu" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert load_task(ckpt).hparams.model == "mnist-hyper"


@pytest.mark.parametrize("name", CONFIGS)
def test_recipes_build(name, tmp_path, no_argv):
    cli = run_cli(["--config", str(REPO / "configs" / name), "--runs_root", str(tmp_path)], run=False)
    assert isinstance(cli.model, ImageClassifier)
    assert cli.model.hparams.model in name
    assert Path(cli.trainer.default_root_dir) == tmp_path / Path(name).stem


def test_paper_step_schedule_and_bad_options():
    task = ImageClassifier(model="mnist-conv", lr_milestones=[3, 6], lr_values=[0.002, 0.001, 0.0002])
    cfg = task.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert cfg["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.002] * 3 + [0.001] * 3 + [0.0002] * 2)
    with pytest.raises(ValueError, match="lr_values"):
        ImageClassifier(model="mnist-conv", lr_milestones=[3], lr_values=[0.1])
    with pytest.raises(ValueError, match="optimizer"):
        ImageClassifier(model="mnist-conv", optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown model"):
        ImageClassifier(model="no-such-net")

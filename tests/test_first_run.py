"""A first run as a new user makes it: one data folder, a clear paragraph when data is missing,
short errors for typos, quiet redirected output."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import require_file

from hypernetworks import _console
from hypernetworks.cli import main as cli_main
from hypernetworks.data import root as data_root_mod
from hypernetworks.data.images import CIFAR10DataModule, MNISTDataModule
from hypernetworks.data.parallel import TranslationDataModule
from hypernetworks.data.root import DataNotFoundError, data_root, dataset_dir
from hypernetworks.data.strokes import IAMOnDBDataModule
from hypernetworks.data.text import Enwik8DataModule, PTBCharDataModule

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))  # configs/study/ are the lead's own runs


# ----------------------------------------------------------------------------- the data folder

def test_data_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERNETWORKS_DATA", str(tmp_path / "mine"))
    assert data_root() == tmp_path / "mine"
    monkeypatch.delenv("HYPERNETWORKS_DATA")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "hypernetworks"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".local" / "share" / "hypernetworks"


def test_conftest_points_the_data_folder_at_the_shared_data():
    assert os.environ["HYPERNETWORKS_DATA"]
    assert data_root() == Path(os.environ["HYPERNETWORKS_DATA"])


@pytest.mark.parametrize("make, attr, expected", [
    (lambda: PTBCharDataModule(), "root", "ptb"),
    (lambda: MNISTDataModule(), "root", "mnist"),
    (lambda: CIFAR10DataModule(), "root", "cifar10"),
    (lambda: Enwik8DataModule(), "path", "enwik8/enwik8.zip"),
    (lambda: IAMOnDBDataModule(), "path", "iam_ondb/iam_ondb_linestrokes.npz"),
    (lambda: TranslationDataModule(dataset="multi30k"), "root", "multi30k_en_fr"),
    (lambda: TranslationDataModule(dataset="tatoeba"), "root", "tatoeba_anki_fra_eng"),
    (lambda: TranslationDataModule(dataset="wmt14"), "root", "wmt14_en_fr"),
], ids=["ptb", "mnist", "cifar10", "enwik8", "iam", "multi30k", "tatoeba", "wmt14"])
def test_every_data_module_defaults_to_the_data_folder_read_when_built(make, attr, expected, monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERNETWORKS_DATA", str(tmp_path))
    assert Path(getattr(make(), attr)) == tmp_path / expected


def test_an_explicit_root_is_used_as_given(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERNETWORKS_DATA", str(tmp_path))
    assert PTBCharDataModule(root="../shared/data/ptb").root == "../shared/data/ptb"
    assert MNISTDataModule(root="rel/mnist").root == Path("rel/mnist")
    assert TranslationDataModule(dataset="multi30k", root="x/y").root == Path("x/y")
    assert dataset_dir("ptb", "a/b") == Path("a/b")


def test_downloads_are_on_by_default_only_where_the_owner_publishes_the_data():
    assert MNISTDataModule().download and CIFAR10DataModule().download and Enwik8DataModule().download
    assert {k for k, v in data_root_mod.DATASETS.items() if v.downloadable} == {"mnist", "cifar10", "enwik8", "wmt14"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_read_the_data_folder(recipe, monkeypatch, tmp_path):
    """No recipe hard-codes a data location: its data module resolves under $HYPERNETWORKS_DATA."""
    text = recipe.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "shared/data" not in code and ".cache" not in code
    data = yaml.safe_load(text)["data"]
    module, _, name = data["class_path"].rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    monkeypatch.setenv("HYPERNETWORKS_DATA", str(tmp_path))
    dm = cls(**data.get("init_args", {}))
    location = getattr(dm, "root", None) or getattr(dm, "path", None)
    if location is not None:  # the pydoc text ships with Python
        assert Path(location).is_relative_to(tmp_path), location


# ----------------------------------------------------------------------------- missing data

@pytest.mark.parametrize("make, names", [
    (lambda: PTBCharDataModule(), ["ptb.char.train.txt", "ptb.char.valid.txt", "ptb.char.test.txt"]),
    (lambda: MNISTDataModule(download=False), ["train-images-idx3-ubyte.gz"]),
    (lambda: CIFAR10DataModule(download=False), ["cifar-10-batches-py", "cifar10_jpg.tar.gz"]),
    (lambda: Enwik8DataModule(download=False), ["enwik8.zip"]),
    (lambda: IAMOnDBDataModule(), ["iam_ondb_linestrokes.npz"]),
    (lambda: TranslationDataModule(dataset="multi30k"), ["train.en", "val.fr"]),
    (lambda: TranslationDataModule(dataset="tatoeba"), ["fra-eng.zip"]),
], ids=["ptb", "mnist", "cifar10", "enwik8", "iam", "multi30k", "tatoeba"])
def test_missing_data_is_one_paragraph_naming_file_place_and_remedy(make, names, monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERNETWORKS_DATA", str(tmp_path))
    dm = make()
    with pytest.raises(DataNotFoundError) as info:
        dm.prepare_data()  # what Lightning calls first
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for n in names:
        assert n in msg
    flat = " ".join(msg.split())
    assert str(tmp_path) in flat and "HYPERNETWORKS_DATA" in flat and "--data.init_args." in flat
    assert ("download true" in flat) == data_root_mod.DATASETS[info.value.dataset].downloadable
    assert "\n\n" not in msg and len(msg) < 900


def test_missing_data_check_passes_when_the_files_are_there(shared_data):
    PTBCharDataModule().check_data()
    MNISTDataModule(download=False).check_data()
    TranslationDataModule(dataset="multi30k").check_data()


def test_an_explicit_wrong_root_is_reported_as_such(tmp_path):
    with pytest.raises(DataNotFoundError, match="given explicitly"):
        PTBCharDataModule(root=str(tmp_path / "nowhere")).check_data()


def test_fit_without_data_prints_the_paragraph_and_leaves_nothing(tmp_path):
    """The real command, as a new user types it, from a folder without data."""
    env = {**os.environ, "HYPERNETWORKS_DATA": str(tmp_path / "empty"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hypernetworks.cli", "fit", "--config", str(REPO / "configs/ptb-small-hyperlstm.yaml"),
         "--runs_root", str(tmp_path / "runs")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "Penn Treebank (character level) not found" in proc.stderr
    assert str(tmp_path / "empty" / "ptb") in " ".join(proc.stderr.split())
    assert "args parameter" not in proc.stderr and "Tip:" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists()


def test_fit_with_the_data_folder_trains_quietly(shared_data, tmp_path, capfd, monkeypatch):
    """The recipe finds PTB through $HYPERNETWORKS_DATA alone and trains, with output captured (not a
    terminal): no progress-bar frames, no advertising, no warning about LightningCLI's args. The data
    folder holds the first lines of the real PTB files (reading all 5M characters takes 20 s)."""
    for split in ("train", "valid", "test"):
        src = require_file(shared_data / "ptb" / f"ptb.char.{split}.txt")
        with open(src) as f:
            head = "".join(f.readline() for _ in range(400 if split == "train" else 60))
        (tmp_path / "data" / "ptb").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "ptb" / src.name).write_text(head)
    monkeypatch.setenv("HYPERNETWORKS_DATA", str(tmp_path / "data"))
    rc = cli_main(["fit", "--config", str(REPO / "configs/ptb-small-hyperlstm.yaml"), "--runs_root", str(tmp_path),
                   "--run_name", "r", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                   "--trainer.limit_val_batches", "1", "--model.init_args.hidden_size", "16",
                   "--model.init_args.hyper_size", "8", "--data.init_args.batch_size", "4",
                   "--data.init_args.seq_len", "10", "--data.init_args.eval_batch_size", "4",
                   "--data.init_args.unknown", "skip"])  # the excerpt of train lacks a few symbols
    assert rc == 0
    out = capfd.readouterr()
    text = out.out + out.err
    assert (tmp_path / "r" / "checkpoints" / "last.ckpt").is_file()
    assert "it/s" not in text and "\r" not in text
    assert "Tip:" not in text and "args parameter" not in text
    assert len(text) < 4000, text


# ----------------------------------------------------------------------------- typos, terminals

def test_a_config_typo_is_a_short_error_with_suggestions(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", "configs/ptb-smal-hyperlstm.yaml"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "config file not found: configs/ptb-smal-hyperlstm.yaml" in err
    assert "configs/ptb-small-hyperlstm.yaml" in err and len(err.splitlines()) <= 2


def test_a_mistyped_option_prints_a_short_usage(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", "configs/pydoc-lstm.yaml", "--trainer.max_stepz", "2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "max_stepz" in err and len(err.splitlines()) <= 6, err


def test_progress_bars_only_on_a_terminal(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stdout", Stream(True))
    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert _console.interactive()
    monkeypatch.setattr(sys, "stdout", Stream(False))
    assert not _console.interactive()


def test_lightning_tips_and_banner_are_dropped_and_other_messages_kept():
    from lightning.fabric.utilities.seed import seed_everything
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed")]
    handler, levels = Keep(), [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        _console.quiet_lightning()
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
        rank_zero_info("TPU available: False, using: 0 TPU cores")
        rank_zero_info("HPU available: False, using: 0 HPUs")
        seed_everything(3)
        rank_zero_info("Restoring states from the checkpoint path at runs/x/checkpoints/last.ckpt")
        rank_zero_info("`Trainer.fit` stopped: `max_steps=2` reached.")
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    assert records == ["Restoring states from the checkpoint path at runs/x/checkpoints/last.ckpt",
                       "`Trainer.fit` stopped: `max_steps=2` reached."]


def test_lightnings_own_deprecation_warning_is_silenced_and_real_warnings_kept():
    import warnings

    from lightning.pytorch.utilities import rank_zero_warn
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _console.quiet_lightning()
        _tree_flatten({"a": 1})  # builds torch's deprecated LeafSpec inside Lightning
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ... instead.", FutureWarning)  # not Lightning
        rank_zero_warn("a real warning from Lightning")
        warnings.warn("The dataloader does not have many workers", UserWarning)
    assert [str(w.message)[:30] for w in caught] == [
        "`isinstance(treespec, LeafSpec", "a real warning from Lightning", "The dataloader does not have m"]


def test_fit_resume_and_test_print_no_banner_and_no_lightning_deprecation(tmp_path, capfd):
    """The documented commands (fit, resume with --ckpt_path last, test), output captured: no banner
    line, no advertising, no deprecation warning from Lightning's code, no warning that the
    checkpoint folder is not empty on the resume."""
    base = ["--config", str(REPO / "configs/pydoc-lstm.yaml"), "--runs_root", str(tmp_path), "--run_name", "r",
            "--model.init_args.hidden_size", "16", "--data.init_args.batch_size", "4", "--data.init_args.seq_len", "16",
            "--data.init_args.eval_batch_size", "4", "--trainer.limit_val_batches", "2",
            "--trainer.limit_test_batches", "2"]
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # pytest would otherwise hold them back
        warnings.simplefilter("always")
        assert cli_main(["fit", *base, "--trainer.max_steps", "2"]) == 0
        assert cli_main(["fit", *base, "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 0
        assert cli_main(["test", *base, "--ckpt_path", str(tmp_path / "r" / "checkpoints" / "last.ckpt")]) == 0
    # what Python shows by default (DeprecationWarning is hidden outside __main__; jsonargparse
    # raises a few from inside Lightning's CLI)
    assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    out = capfd.readouterr()
    text = out.out + out.err
    for noise in ("GPU available", "TPU available", "Seed set", "Tip:", "LeafSpec", "not empty", "Warning"):
        assert noise not in text, (noise, text)
    assert "test_bpc" in text
    # a fresh run into the same folder is warned about: it replaces the run's last.ckpt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(["fit", *base, "--trainer.max_steps", "2"]) == 0
    assert ["already holds checkpoints" in str(w.message) for w in caught] == [True]


def test_demo_output_redirected_is_small_and_has_no_tips(tmp_path, capfd):
    assert cli_main(["demo", "--quick", "--steps", "2", "--sample-length", "20", "--run-dir", str(tmp_path)]) == 0
    out = capfd.readouterr()
    text = out.out + out.err
    assert "valid bpc" in out.out
    assert "Tip:" not in text and "it/s" not in text and "\r" not in text
    assert len(text) < 2000, text


def test_demo_rerun_points_at_its_own_checkpoints(tmp_path, capfd, monkeypatch):
    """A second demo into the same folder replaces the first: results.json and the printed paths
    name the files this run wrote, and no checkpoint of the earlier run is left for serve to list.
    --quick runs in its own folder, runs/demo-quick, beside the full demo's runs/demo."""
    import json

    import torch

    monkeypatch.chdir(tmp_path)
    run = Path("runs/demo-quick")
    quick = ["demo", "--quick", "--sample-length", "20"]
    assert cli_main([*quick, "--steps", "3"]) == 0
    assert (run / "results.json").is_file() and not Path("runs/demo").exists()
    capfd.readouterr()
    assert cli_main([*quick, "--steps", "2", "--run-dir", str(run)]) == 0
    out = capfd.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert [r["cell"] for r in results] == ["hyperlstm", "lstm"]
    for r in results:
        ckpt = Path(r["checkpoint"])
        assert ckpt.is_file() and r["checkpoint"] in out
        assert torch.load(ckpt, weights_only=True)["global_step"] == 2
        assert sorted(p.name for p in (run / r["cell"] / "checkpoints").iterdir()) == ["best-step=2.ckpt", "last.ckpt"]
        assert [p.name for p in (run / r["cell"] / "csv").iterdir()] == ["version_0"]
    assert "Replacing the earlier demo" in out
    assert sorted(p.name for p in run.rglob("*.ckpt")) == ["best-step=2.ckpt"] * 2 + ["last.ckpt"] * 2
    # a folder holding runs of another command (no demo marker, no results.json) is not touched
    other = Path("runs/mine")
    (other / "lstm" / "checkpoints").mkdir(parents=True)
    (other / "lstm" / "checkpoints" / "last.ckpt").write_bytes(b"kept")
    with pytest.raises(SystemExit, match="not a demo's"):
        cli_main([*quick, "--steps", "2", "--run-dir", str(other)])
    assert (other / "lstm" / "checkpoints" / "last.ckpt").read_bytes() == b"kept"


def test_tests_cannot_download():
    import urllib.request

    with pytest.raises(RuntimeError, match="tried to download"):
        urllib.request.urlopen("https://example.com/data.zip")


class LateMissingData(PTBCharDataModule):
    """A data module whose files go missing only once training has started (after the CLI's check)."""

    def check_data(self) -> None:
        pass

    run_dir_existed: list[bool] = []

    def setup(self, stage=None):
        LateMissingData.run_dir_existed.append(Path(self.trainer.default_root_dir).is_dir())
        data_root_mod.require_files("ptb", [[Path(self.root) / "ptb.char.train.txt"]], explicit=True)


def test_a_run_folder_created_before_data_went_missing_is_removed(tmp_path, capsys):
    recipe = tmp_path / "late.yaml"
    recipe.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 1, "accelerator": "cpu", "devices": 1, "enable_model_summary": False},
        "model": {"class_path": "hypernetworks.tasks.language_model.LanguageModelTask",
                  "init_args": {"cell": "lstm", "hidden_size": 8}},
        "data": {"class_path": f"{__name__}.LateMissingData", "init_args": {"root": str(tmp_path / "none")}},
    }))
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(recipe), "--runs_root", str(tmp_path / "runs")])
    assert info.value.code == 1
    assert "not found" in capsys.readouterr().err
    assert LateMissingData.run_dir_existed == [True]  # Lightning had created it before setup
    assert list((tmp_path / "runs").iterdir()) == []  # and it is gone


def test_an_existing_run_folder_is_kept(tmp_path, capsys):
    run = tmp_path / "runs" / "ptb-small-hyperlstm"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"kept")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs/ptb-small-hyperlstm.yaml"), "--runs_root", str(tmp_path / "runs"),
                  "--data.init_args.root", str(tmp_path / "none")])
    assert "given explicitly" in " ".join(capsys.readouterr().err.split())
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"kept"

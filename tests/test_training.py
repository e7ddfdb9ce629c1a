"""The shared training entry point: CLI + recipes, atomic checkpoints, load_task, exact resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything

from hypernetworks.data.text import PydocTextDataModule
from hypernetworks.tasks.language_model import LanguageModelTask
from hypernetworks.training import AtomicCheckpointIO, load_task, make_trainer, run_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TINY = ["--model.init_args.hidden_size", "16", "--model.init_args.hyper_size", "8",
        "--data.init_args.batch_size", "4", "--data.init_args.seq_len", "16", "--data.init_args.eval_batch_size", "4",
        "--trainer.limit_val_batches", "2", "--trainer.enable_model_summary", "false",
        "--trainer.enable_progress_bar", "false"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_recipe_parses_and_builds_its_model(config, tmp_path):
    """Each configs/*.yaml parses, and its model and data classes instantiate (no data read, no training)."""
    # GPU recipes: the hardware options are parsed from the file, then replaced so a CPU-only
    # machine can build the Trainer too
    cpu = [] if torch.cuda.is_available() else [
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.num_nodes", "1", "--trainer.precision", "32-true"]
    cli = run_cli(["--config", str(config), "--runs_root", str(tmp_path), *cpu], run=False)
    from lightning.pytorch import LightningDataModule, LightningModule

    model = cli.model
    assert isinstance(model, LightningModule) and isinstance(cli.datamodule, LightningDataModule)
    if isinstance(model, LanguageModelTask):  # builds lazily from the data's vocabulary: give it one
        with torch.device("meta"):
            model._build([chr(33 + i) for i in range(50)])
        assert sum(p.numel() for p in model.parameters()) > 0
    assert cli.datamodule is not None and cli.trainer is not None
    assert Path(cli.trainer.default_root_dir) == tmp_path / config.stem


def test_cli_fit_writes_run_dir_and_load_task_rebuilds(tmp_path):
    args = ["fit", "--config", str(REPO / "configs/pydoc-hyperlstm.yaml"), "--runs_root", str(tmp_path),
            "--run_name", "r", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", *TINY]
    run_cli(args)
    run = tmp_path / "r"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(c.startswith("best-") for c in ckpts)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp files left
    assert (run / "csv" / "version_0" / "metrics.csv").is_file()
    assert any((run / "tb" / "version_0").glob("events.out.tfevents.*"))
    task = load_task(run / "checkpoints" / "last.ckpt")
    assert isinstance(task, LanguageModelTask) and not task.training
    assert task.hparams.cell == "hyperlstm" and task.hparams.hidden_size == 16
    assert len(task.sample(20, seed=0, prime="def ")) == 20
    # resume from last with the CLI: continues at step 3
    run_cli([*args[:-len(TINY)], *TINY, "--trainer.max_steps", "5", "--ckpt_path", "last"])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_bad_config_values_give_clear_errors(tmp_path, capsys):
    base = ["--config", str(REPO / "configs/pydoc-lstm.yaml"), "--runs_root", str(tmp_path)]
    with pytest.raises(SystemExit):  # the task's ValueError, as one paragraph
        run_cli([*base, "--model.init_args.lr", "0"], run=False)
    assert "lr must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli([*base, "--data.init_args.batch_size", "0"], run=False)
    assert "batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli([*base, "--data.init_args.seq_len", "many"], run=False)
    assert "seq_len" in capsys.readouterr().err


def test_atomic_checkpoint_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    before = target.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_load_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_task(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt"):
        load_task(bad)
    alien = tmp_path / "alien.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "evil.module.Task"}}, alien)
    with pytest.raises(ValueError, match="evil.module.Task"):
        load_task(alien)


def _fit(run_dir, max_steps, ckpt_path=None):
    seed_everything(0)
    dm = PydocTextDataModule(batch_size=4, seq_len=16, eval_batch_size=4)
    task = LanguageModelTask(cell="hyperlstm", hidden_size=16, hyper_size=8, input_dropout=0.1,
                             output_dropout=0.1, recurrent_dropout=0.1)
    trainer = make_trainer(run_dir, LanguageModelTask, max_steps=max_steps, val_check_interval=4,
                           limit_val_batches=3, enable_progress_bar=False, enable_model_summary=False,
                           num_sanity_val_steps=0, gradient_clip_val=1.0)
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return task, trainer


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    full, full_trainer = _fit(tmp_path / "full", 8)
    _fit(tmp_path / "split", 4)  # stops at step 4, mid-epoch, after writing last.ckpt
    mid = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    assert mid["global_step"] == 4
    resumed, resumed_trainer = _fit(tmp_path / "split", 8, ckpt_path="last")
    assert resumed_trainer.global_step == full_trainer.global_step == 8
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed_trainer.callback_metrics["val_bpc"].item() == pytest.approx(
        full_trainer.callback_metrics["val_bpc"].item(), rel=1e-5)
    # and the run really moved: the resumed weights differ from those of the step-4 checkpoint
    assert any(not torch.equal(mid["state_dict"][k], v) for k, v in resumed.state_dict().items())


def test_last_checkpoint_is_the_latest_state_even_without_improvement(tmp_path):
    """Lightning's save_last only rewrites last.ckpt when the monitored metric improves; ours
    writes it at every validation, so --ckpt_path last resumes where training stopped."""
    seed_everything(0)
    dm = PydocTextDataModule(batch_size=4, seq_len=16, eval_batch_size=4)
    task = LanguageModelTask(cell="lstm", hidden_size=8, lr=1e-30)  # updates below float32 resolution: no improvement after the first
    trainer = make_trainer(tmp_path, LanguageModelTask, max_steps=8, val_check_interval=2, limit_val_batches=2,
                           enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("best-*.ckpt")) == ["best-step=2.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 8


# ----------------------------------------------------------------------------- short trials, resumes, progress

def _csv_rows(path):
    import csv

    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def test_a_short_trial_validates_and_keeps_a_best_checkpoint(tmp_path):
    """max_steps cuts the recipe (val_check_interval 100) before its first validation: the run still
    validates at its last step, so it leaves a metric and a best checkpoint."""
    run_cli(["fit", "--config", str(REPO / "configs/pydoc-lstm.yaml"), "--runs_root", str(tmp_path), "--run_name", "r",
             "--trainer.max_steps", "3", *TINY])
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts == ["best-step=3.ckpt", "last.ckpt"]
    rows = _csv_rows(tmp_path / "r" / "csv" / "version_0" / "metrics.csv")
    assert [r["step"] for r in rows if "val_bpc" in r] == ["2"]


def test_validation_at_max_steps_runs_once_when_it_falls_on_a_validation(tmp_path):
    seed_everything(0)
    dm = PydocTextDataModule(batch_size=4, seq_len=16, eval_batch_size=4)
    task = LanguageModelTask(cell="lstm", hidden_size=8)
    trainer = make_trainer(tmp_path, LanguageModelTask, max_steps=4, val_check_interval=2, limit_val_batches=1,
                           enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    rows = _csv_rows(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert [r["step"] for r in rows if "val_bpc" in r] == ["1", "3"]


def test_resume_appends_to_the_runs_metrics(tmp_path):
    """--ckpt_path last continues csv/version_0 (one metrics.csv for the whole run, equal to that
    of an uninterrupted run) and tb/version_0; rows an interrupted run logged after its last
    checkpoint are dropped; a later test run gets its own version, and a resume after it still
    continues the fit's version."""
    base = ["fit", "--config", str(REPO / "configs/pydoc-lstm.yaml"), "--runs_root", str(tmp_path),
            "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1", *TINY]
    run_cli([*base, "--run_name", "full", "--trainer.max_steps", "6"])
    run_cli([*base, "--run_name", "r", "--trainer.max_steps", "4"])
    metrics = tmp_path / "r" / "csv" / "version_0" / "metrics.csv"
    with open(metrics, "a") as f:  # what a run killed at step 5, after its step-4 checkpoint, leaves
        f.write("0,4,9.0,9.0,\n")
    run_cli([*base, "--run_name", "r", "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert [p.name for p in (tmp_path / "r" / "csv").iterdir()] == ["version_0"]
    assert [p.name for p in (tmp_path / "r" / "tb").iterdir()] == ["version_0"]
    assert len(list((tmp_path / "r" / "tb" / "version_0").glob("events.out.tfevents.*"))) == 2
    full, resumed = _csv_rows(tmp_path / "full" / "csv" / "version_0" / "metrics.csv"), _csv_rows(metrics)
    assert [sorted(r) for r in resumed] == [sorted(r) for r in full]
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == ["0", "1", "1", "2", "3", "3", "4", "5", "5"]
    for a, b in zip(full, resumed):
        for k in a:
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5), (k, a, b)
    assert (tmp_path / "r" / "csv" / "version_0" / "config.yaml").is_file()
    # test writes a version of its own; resuming afterwards continues the fit's version again
    run_cli(["test", *base[1:], "--run_name", "r", "--ckpt_path", str(tmp_path / "r" / "checkpoints" / "last.ckpt")])
    assert (tmp_path / "r" / "csv" / "version_1" / "metrics.csv").is_file()
    run_cli([*base, "--run_name", "r", "--trainer.max_steps", "8", "--ckpt_path", "last"])
    assert sorted(p.name for p in (tmp_path / "r" / "csv").iterdir()) == ["version_0", "version_1"]
    assert _csv_rows(metrics)[-1]["step"] == "7"


def _tiny_fit(tmp_path, callbacks=(), **kwargs):
    seed_everything(0)
    dm = PydocTextDataModule(batch_size=4, seq_len=16, eval_batch_size=4)
    task = LanguageModelTask(cell="lstm", hidden_size=8)
    kwargs = {"max_steps": 6, "val_check_interval": 3, "limit_val_batches": 2, "limit_test_batches": 3,
              "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0, **kwargs}
    trainer = make_trainer(tmp_path, LanguageModelTask, callbacks=list(callbacks), **kwargs)
    trainer.fit(task, datamodule=dm)
    return trainer, task, dm


def test_progress_lines_without_a_progress_bar(tmp_path, capsys):
    from hypernetworks.callbacks import ProgressLines

    trainer, task, dm = _tiny_fit(tmp_path, [ProgressLines(every_s=0)])
    lines = capsys.readouterr().out.splitlines()
    fit = [line for line in lines if line.startswith("fit: ")]
    # every_s=0: a line at the first step, then spaced by a tenth of the elapsed time
    assert fit[0].startswith("fit: step 1/6 (17%), loss ") and "elapsed " in fit[0] and ", left ~" in fit[0]
    assert fit[-1].startswith("fit: done, step 6/6 (100%)") and "val_bpc " in fit[-1]
    assert len(fit) == len(set(fit)) >= 3
    # the default instance stood aside for the one given
    assert [c._active for c in trainer.callbacks if isinstance(c, ProgressLines)] == [False, True]
    trainer.test(task, datamodule=dm)
    test = [line for line in capsys.readouterr().out.splitlines() if line.startswith("test: ")]
    assert test[0].startswith("test: batch 1/3 (33%), elapsed ") and ", left ~" in test[0]
    assert test[-1].startswith("test: done, batch 3/3 (100%)")


def test_no_progress_lines_with_a_progress_bar_or_on_a_short_run(tmp_path, capsys):
    from hypernetworks.callbacks import ProgressLines, _duration

    _tiny_fit(tmp_path / "bar", [ProgressLines(every_s=0)], enable_progress_bar=True)
    assert "fit: step" not in capsys.readouterr().out
    _tiny_fit(tmp_path / "short")  # the default: a line every 30 s, none for a run of a second
    assert "fit: " not in capsys.readouterr().out
    assert [_duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]

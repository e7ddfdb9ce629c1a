"""The converged study's tooling: the report rebuilt from a results/ folder alone, the
char LM's learning-rate-on-plateau option, and the wall-clock callback."""
from __future__ import annotations

import csv
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from hypernetworks.callbacks import WallClock
from hypernetworks.data.text import PydocTextDataModule
from hypernetworks.tasks.language_model import LanguageModelTask

REPO = Path(__file__).resolve().parents[1]


def _study_module():
    spec = importlib.util.spec_from_file_location("converged_study", REPO / "benchmarks" / "converged_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["converged_study"] = mod
    spec.loader.exec_module(mod)
    return mod


def _write_run(root: Path, study: str, cell: str, seed: int, test_bpc: float, params: int, wall: float,
               status: str = "ok") -> None:
    d = root / study / cell / f"seed{seed}"
    d.mkdir(parents=True)
    info = dict(study=study, cell=cell, seed=seed, status=status, params=params, epochs=3.0,
                train_wall_s=wall)
    if status == "ok":
        info["test_bpc"] = test_bpc
    (d / "final.json").write_text(json.dumps(info))
    with open(d / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["step", "epoch", "val_bpc", "wall_s"])
        w.writeheader()
        for k, step in enumerate((100, 200, 300)):
            w.writerow(dict(step=step, epoch=k, val_bpc=test_bpc + 0.3 - 0.1 * k, wall_s=wall * (k + 1) / 3))


def test_report_rebuilds_the_table_from_records(tmp_path):
    study = _study_module()
    res = tmp_path / "results"
    _write_run(res, "ptb", "lstm", 0, 1.60, 98_098, 600)
    _write_run(res, "ptb", "lstm", 1, 1.64, 98_098, 660)
    _write_run(res, "ptb", "ln-hyperlstm", 0, 1.50, 171_474, 1200)
    _write_run(res, "ptb", "ln-hyperlstm", 1, 1.52, 171_474, 1260)
    _write_run(res, "ptb", "ln-hyperlstm", 2, float("nan"), 171_474, 30, status="failed")
    table = study.table(res, "ptb")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines()[2:]}
    assert set(rows) == {"LSTM 128", "LN HyperLSTM 128"}
    sd = statistics.stdev([1.60, 1.64])
    assert rows["LSTM 128"] == ["2 (0, 1)", "98,098", f"1.620 ± {sd:.3f}", "3.0 ± 0.0", "10 ± 1", "0"]
    # the failed run is counted, not averaged in
    assert rows["LN HyperLSTM 128"][0] == "2 (0, 1)" and rows["LN HyperLSTM 128"][-1] == "1"
    assert rows["LN HyperLSTM 128"][2] == f"1.510 ± {statistics.stdev([1.50, 1.52]):.3f}"
    sep = study.separation(res, "ptb", "ln-hyperlstm", "lstm")
    pooled = ((statistics.variance([1.60, 1.64]) + statistics.variance([1.50, 1.52])) / 2) ** 0.5
    assert f"{0.11 / pooled:.1f} pooled std" in sep

    assert study.main(["report", "--results", str(res), "--out", str(tmp_path / "docs")]) == 0
    assert (res / "ptb" / "TABLE.md").read_text().count("|") > 10
    assert (tmp_path / "docs" / "study-ptb.png").stat().st_size > 1000


def test_lr_halves_on_plateau_and_wall_clock_logged(tmp_path):
    torch.manual_seed(0)
    # threshold 100 bpc: no validation after the first counts as an improvement, so each halves the rate
    task = LanguageModelTask(cell="lstm", hidden_size=8, lr=2e-3, lr_plateau_factor=0.5, lr_plateau_patience=0,
                             lr_plateau_threshold=100.0)
    dm = PydocTextDataModule(batch_size=4, seq_len=10, eval_batch_size=4)
    trainer = Trainer(max_steps=6, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[WallClock()])
    trainer.fit(task, dm)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2e-3 * 0.5 ** 2)
    assert task._plateau.state_dict()["num_bad_epochs"] == 0  # reset after each reduction
    assert float(trainer.callback_metrics["wall_s"]) > 0


def test_lr_plateau_arguments_checked():
    with pytest.raises(ValueError, match="lr_plateau_factor"):
        LanguageModelTask(lr_plateau_factor=1.5)
    with pytest.raises(ValueError, match="lr_plateau_patience"):
        LanguageModelTask(lr_plateau_factor=0.5, lr_plateau_patience=-1)


def test_wall_clock_survives_a_resume():
    clock = WallClock()
    clock.load_state_dict({"elapsed": 12.5})
    assert clock.state_dict()["elapsed"] == pytest.approx(12.5)


def test_continuation_without_a_new_best_tests_the_sources_best(tmp_path):
    """The tested checkpoint is the best by validation over the whole chain: a continuation whose
    validations are all worse than its source's best uses the source's best checkpoint."""
    study = _study_module()
    src, run = tmp_path / "ptb-long-x-seed0", tmp_path / "ptb-plateau-x-seed0"
    for d, steps in ((src, (392, 785)), (run, (1177, 1570))):
        (d / "checkpoints").mkdir(parents=True)
        for s in steps:
            (d / "checkpoints" / f"best-step={s}.ckpt").write_bytes(b"")
    rows = [{"step": "391", "val_bpc": "1.70"}, {"step": "784", "val_bpc": "1.60"},    # source: best 1.60
            {"step": "1176", "val_bpc": "1.61"}, {"step": "1569", "val_bpc": "1.6001"},  # continuation: worse
            {"step": "1600", "train_bpc": "1.2"}]
    assert study.best_checkpoint([run, src], rows, "val_bpc") == src / "checkpoints" / "best-step=785.ckpt"
    rows.append({"step": "1960", "val_bpc": "1.59"})
    (run / "checkpoints" / "best-step=1961.ckpt").write_bytes(b"")
    assert study.best_checkpoint([run, src], rows, "val_bpc") == run / "checkpoints" / "best-step=1961.ckpt"
    assert study.best_checkpoint([run], [{"step": "5", "val_bpc": "nan"}], "val_bpc") is None


def test_checkpoint_callback_keeps_its_best_score_in_a_copied_run_folder(tmp_path):
    """Lightning drops best_model_score when the folder changed; a continued run in a new folder
    would then call its first, possibly worse, validation the best."""
    from hypernetworks.training import BestAndLastCheckpoint

    old, new = str(tmp_path / "a" / "checkpoints"), str(tmp_path / "b" / "checkpoints")
    saved = BestAndLastCheckpoint(dirpath=old, monitor="val_bpc", mode="min", filename="best-{step}")
    saved.best_model_score = torch.tensor(1.5)
    saved.best_model_path = f"{old}/best-step=10.ckpt"
    saved.best_k_models = {saved.best_model_path: torch.tensor(1.5)}
    saved.kth_best_model_path = saved.best_model_path
    saved.last_model_path = f"{old}/last.ckpt"
    loaded = BestAndLastCheckpoint(dirpath=new, monitor="val_bpc", mode="min", filename="best-{step}")
    loaded.load_state_dict(saved.state_dict())
    assert float(loaded.best_model_score) == 1.5
    assert loaded.best_model_path == f"{new}/best-step=10.ckpt"
    assert list(loaded.best_k_models) == [f"{new}/best-step=10.ckpt"]


def test_lr_min_floors_the_plateau_schedule(tmp_path):
    torch.manual_seed(0)
    task = LanguageModelTask(cell="lstm", hidden_size=8, lr=2e-3, lr_plateau_factor=0.5, lr_plateau_patience=0,
                             lr_plateau_threshold=100.0, lr_min=1e-3)
    dm = PydocTextDataModule(batch_size=4, seq_len=10, eval_batch_size=4)
    trainer = Trainer(max_steps=8, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, dm)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)  # 2e-3 halved 3 times, floored
    with pytest.raises(ValueError, match="lr_min"):
        LanguageModelTask(lr=1e-3, lr_min=1e-2)

"""The training entry point shared by every experiment (Lightning CLI).

A recipe is a LightningCLI YAML file:

    seed_everything: 0
    trainer: {max_steps: 1000, gradient_clip_val: 1.0, ...}
    model: {class_path: hypernetworks.tasks.<module>.<Task>, init_args: {...}}
    data:  {class_path: hypernetworks.data.<module>.<DataModule>, init_args: {...}}

so any LightningModule / LightningDataModule of the package (or the user's) can be trained:

    python -m hypernetworks.cli fit --config configs/<recipe>.yaml [--trainer.max_steps 10] [--run_name x]
    python -m hypernetworks.cli fit --config configs/<recipe>.yaml --ckpt_path last      # exact resume

Defaults added to every run (all overridable from YAML or the command line):

* one run directory, ``<runs_root>/<run_name>`` (``runs/<config file stem>``), holding
  ``checkpoints/`` (``last.ckpt`` and the best by the task's ``monitor`` metric), ``csv/`` and ``tb/`` logs;
* checkpoints written atomically (temporary file in the same folder, then ``os.replace``), so a run
  killed while saving never leaves a truncated ``last.ckpt``; the temporary files of such a killed
  write are removed when the next run starts (:func:`remove_stale_temporaries`);
* checkpoints read safely, by ``--ckpt_path`` (local path or URL) and by :func:`load_task` alike: the
  zip archive's CRCs are checked, nothing is unpickled (``weights_only=True``), and only the project's
  own task, data and model classes are built from saved settings (:mod:`hypernetworks.checkpoints`);
* :class:`StopOnNonFinite`: the run stops at the first NaN/inf (or diverged) training loss or
  non-finite gradient, naming the step, before the update is applied and without writing a
  checkpoint, and the command exits non-zero; a NaN validation metric is never saved as the best;
* the task's class path stored in every checkpoint, so :func:`load_task` rebuilds any task;
* validation at the last step of a run cut by ``max_steps`` between two validations
  (:class:`~hypernetworks.callbacks.ValidateAtMaxSteps`), so a short trial still leaves a metric and a
  best checkpoint;
* ``--ckpt_path last`` (or a checkpoint of the run's own folder) continues the run's logs: the CSV and
  TensorBoard logs of the latest ``version_N`` are appended to, from the checkpoint's step (rows the
  interrupted run logged after it are dropped), so one ``metrics.csv`` holds the whole run;
* ``seed_everything: 0``; Lightning's TQDM progress bar on a terminal, a progress line every 30 s
  otherwise (:class:`~hypernetworks.callbacks.ProgressLines`).

Tasks may declare class attributes ``monitor = "val_loss"`` and ``monitor_mode = "min"`` to choose
the metric of the "best" checkpoint; a metric that is never logged only disables the best checkpoint.
"""
from __future__ import annotations

import csv
import errno
import importlib
import logging
import math
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from hypernetworks.callbacks import ProgressLines, ValidateAtMaxSteps
from hypernetworks.checkpoints import (CheckpointError, build_from_settings, check_settings, check_weights_fit,
                                      checkpoint_settings, read_checkpoint, resolve_trusted_class)

try:  # POSIX: write locks tell live temporary checkpoint files from those of killed writes
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "BestAndLastCheckpoint",
    "TaskClassPath",
    "HypernetworksCLI",
    "RunCSVLogger",
    "NonFiniteError",
    "StopOnNonFinite",
    "default_callbacks",
    "default_loggers",
    "make_trainer",
    "load_task",
    "remove_stale_temporaries",
    "run_cli",
]

TASK_CLASS_KEY = "hypernetworks_task_class_path"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside the target, fsyncs it, then renames it.

    ``os.replace`` is atomic on POSIX and Windows for paths on one file system, so readers see either
    the old complete file or the new complete file, never a partial one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        if "://" in str(path):  # remote file systems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                if fcntl is not None:  # held until the rename: marks this temporary file as live
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
                if fcntl is not None:
                    os.replace(tmp, path)
            if fcntl is None:  # Windows cannot rename an open file
                os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            from hypernetworks._errors import disk_full

            if isinstance(e, Exception) and disk_full(e) is not None:  # named, not buried in torch's zip writer error
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Checks the archive's CRCs, then ``torch.load(weights_only=True)``: for local files and for
        ``http(s)://`` URLs alike (Lightning's own loader unpickles URLs), so ``--ckpt_path`` cannot run
        code. See :func:`hypernetworks.checkpoints.read_checkpoint`."""
        if weights_only is False:
            raise ValueError(f"{type(self).__name__} loads checkpoints with weights_only=True only "
                             "(checkpoints of this project hold tensors and plain values; no pickle)")
        return read_checkpoint(path, map_location=map_location, lightning=False)


_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")


def remove_stale_temporaries(folder: str | os.PathLike, min_age_s: float = 3600.0) -> list[Path]:
    """Delete the ``.<name>.XXXXXXXX.tmp`` files that :class:`AtomicCheckpointIO` leaves when a
    process is killed while writing, and return their paths.

    A file is stale when no process holds its write lock (POSIX ``flock``; the lock dies with the
    writer), so a run writing to the same folder at the same moment keeps its file. Without
    ``fcntl`` (Windows) only files older than ``min_age_s`` are deleted.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        if not _TMP_NAME.match(f.name) or not f.is_file():
            continue
        try:
            if fcntl is None:
                if time.time() - f.stat().st_mtime >= min_age_s:
                    f.unlink()
                    removed.append(f)
                continue
            with open(f, "rb") as h:
                try:
                    fcntl.flock(h.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live write
                f.unlink()
                removed.append(f)
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
    if removed:
        log.info("removed %d temporary checkpoint file(s) left by an interrupted write: %s",
                 len(removed), ", ".join(p.name for p in removed))
    return removed


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient (raised by :class:`StopOnNonFinite`)."""


class StopOnNonFinite(Callback):
    """Stops training at the first non-finite (or diverged) training loss or non-finite gradient,
    before the optimizer applies the update, with a :class:`NonFiniteError` naming the step and the
    quantity.

    Checked once per optimizer step, with a single device synchronisation:

    * the training loss: NaN/inf, or larger in magnitude than ``max_abs_loss`` (the project's losses
      are per-token or per-point means of order 1-10; a loss of 1e6 has diverged, as with a learning
      rate of 1e30, where the loss reaches 1e31 while staying finite). ``None`` checks finiteness only;
    * the gradients' total 2-norm, the norm that gradient clipping divides by: non-finite if any entry
      is, or if it overflows (as torch's ``clip_grad_norm_(error_if_nonfinite=True)`` would report).

    Lightning writes no checkpoint after an exception, so ``last.ckpt`` and the best checkpoint keep
    the last good state, and the command line exits non-zero. ``skip_batches=True`` instead drops the
    update of such a batch (its gradients are cleared before the step) with a warning, and stops only
    after ``max_consecutive_skips`` bad batches in a row.

    Part of :func:`default_callbacks`; an instance listed in a recipe replaces the default one::

        trainer:
          callbacks:
            - class_path: hypernetworks.training.StopOnNonFinite
              init_args: {skip_batches: true}
    """

    def __init__(self, skip_batches: bool = False, max_consecutive_skips: int = 20,
                 max_abs_loss: float | None = 1e6) -> None:
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        if max_abs_loss is not None and not max_abs_loss > 0:
            raise ValueError(f"max_abs_loss must be positive or None, got {max_abs_loss}")
        self.skip_batches = skip_batches
        self.max_consecutive_skips = max_consecutive_skips
        self.max_abs_loss = max_abs_loss
        self.skipped = 0  # batches whose update was dropped (skip_batches=True)
        self._in_a_row = 0
        self._default = False  # set by default_callbacks
        self._active = True
        self._loss_bad: torch.Tensor | None = None
        self._bad_loss: torch.Tensor | None = None
        self._batch_idx = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        # the default instance stands aside when the recipe lists its own
        self._active = not (self._default and any(
            isinstance(c, StopOnNonFinite) and not c._default for c in trainer.callbacks))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not self._active:
            return
        loss = loss.detach()
        bad = ~torch.isfinite(loss).all()
        if self.max_abs_loss is not None:
            bad = bad | (loss.abs() > self.max_abs_loss).any()
        # stays on the device (no synchronisation here); with gradient accumulation the flags of the
        # micro-batches are or-ed, and the first bad loss is kept for the message
        if self._loss_bad is None:
            self._loss_bad, self._bad_loss = bad, loss
        else:
            self._bad_loss = torch.where(self._loss_bad, self._bad_loss, loss)
            self._loss_bad = self._loss_bad | bad

    def _describe(self, loss_bad: bool, pl_module, optimizer) -> str:
        if loss_bad:
            value = self._bad_loss.float().mean().item()
            if math.isfinite(value):
                return f"diverged training loss ({value:.3g}, above max_abs_loss={self.max_abs_loss:g})"
            return f"non-finite training loss ({value})"
        names = {p: n for n, p in pl_module.named_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            if not torch.isfinite(p.grad).all():
                value = "nan" if torch.isnan(p.grad).any() else "inf"
                return f"non-finite gradient of {names.get(p, 'a parameter')!r} ({value})"
        top = max(params, key=lambda p: p.grad.abs().max().item())
        return (f"non-finite gradient norm (the 2-norm overflows; largest entry {top.grad.abs().max().item():.3g} "
                f"in {names.get(top, 'a parameter')!r})")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._active:
            return
        loss_bad, self._loss_bad = self._loss_bad, None
        flags = [] if loss_bad is None else [loss_bad.reshape(())]
        # with a GradScaler (16-bit mixed precision) infinite gradients are expected now and then:
        # the scaler skips those steps itself
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
                flags.append(~torch.isfinite(norm).to(flags[0].device if flags else norm.device))
        if not flags:
            return
        bad = trainer.strategy.reduce_boolean_decision(bool(torch.stack(flags).any()), all=False)
        if not bad:
            self._in_a_row = 0
            return
        what = self._describe(loss_bad is not None and bool(loss_bad), pl_module, optimizer)
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        if not self.skip_batches:
            raise NonFiniteError(
                f"{what} at {where}: training stopped before this update was applied, and no checkpoint was "
                "written from this state. Lower the learning rate or check the data; "
                "StopOnNonFinite(skip_batches=True) skips such batches instead.")
        self.skipped += 1
        self._in_a_row += 1
        if self._in_a_row > self.max_consecutive_skips:
            raise NonFiniteError(f"{what} at {where}: {self._in_a_row} bad batches in a row "
                                 f"(max_consecutive_skips={self.max_consecutive_skips}); training stopped")
        optimizer.zero_grad(set_to_none=True)  # optimizers skip parameters without a gradient
        rank_zero_warn(f"{what} at {where}: this batch's update was skipped ({self.skipped} so far)")


class TaskClassPath(Callback):
    """Stores ``module.Class`` of the LightningModule in every checkpoint (for :func:`load_task`
    when the task was built without LightningCLI, which otherwise records ``_class_path``)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        cls = type(pl_module)
        checkpoint[TASK_CLASS_KEY] = f"{cls.__module__}.{cls.__qualname__}"


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps ``last.ckpt`` and the best by ``monitor``; if the monitored
    metric is never logged it warns once and keeps only ``last.ckpt`` instead of failing the run.

    ``last.ckpt`` is written at every checkpoint opportunity (each validation), not only when the
    monitored metric improves as Lightning's ``save_last=True`` does: otherwise ``--ckpt_path last``
    would go back to the last improvement and redo (or, after a crash, lose) every step since."""

    _warned = False

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))  # no top-k save this time

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    _not_empty: str | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._not_empty = None
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath):
            remove_stale_temporaries(self.dirpath)

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath) -> None:
        # Lightning warns at setup that the folder is not empty, before it knows whether the run
        # resumes from a checkpoint there (--ckpt_path last, the README's resume command): the check
        # is kept and the warning given at on_train_start, only for a run that starts from scratch
        if self.save_top_k != 0 and dirpath and "://" not in str(dirpath) and Path(dirpath).is_dir() \
                and any(Path(dirpath).glob("*.ckpt")):
            self._not_empty = str(dirpath)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self._not_empty and not trainer.ckpt_path and trainer.is_global_zero:
            rank_zero_warn(f"checkpoint folder {self._not_empty} already holds checkpoints of an earlier run; this "
                           "run starts from scratch and replaces its last.ckpt (--ckpt_path last resumes instead; "
                           "--run_name NAME starts a new folder)")
        self._not_empty = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning forgets the best score when the run folder was copied or moved (a continued
        # run in a new folder): the next validation then becomes "best" even when it is worse. The
        # saved paths are moved into this folder by file name instead, and the score is kept.
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath and "://" not in str(self.dirpath):
            def moved(path: Any) -> Any:
                if isinstance(path, str) and path and os.path.dirname(path) == old:
                    return os.path.join(self.dirpath, os.path.basename(path))
                return path

            state_dict = dict(state_dict, dirpath=self.dirpath,
                              **{k: moved(state_dict.get(k)) for k in
                                 ("best_model_path", "kth_best_model_path", "last_model_path") if k in state_dict})
            if isinstance(state_dict.get("best_k_models"), dict):
                state_dict["best_k_models"] = {moved(k): v for k, v in state_dict["best_k_models"].items()}
        super().load_state_dict(state_dict)

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        current = monitor_candidates.get(self.monitor) if self.monitor is not None else None
        if isinstance(current, torch.Tensor) and not torch.isfinite(current).all():
            # Lightning would still keep it as the first "best": a NaN model must never be the best
            rank_zero_warn(f"{self.monitor} is {current.float().mean().item()} at step {trainer.global_step}: "
                           "not saved as the best checkpoint")
            return
        if self.monitor is not None and self.monitor not in monitor_candidates:
            if not self._warned:
                warnings.warn(
                    f"checkpoint metric {self.monitor!r} is not logged (logged: {sorted(monitor_candidates)}); "
                    "keeping only last.ckpt",
                    stacklevel=2,
                )
                self._warned = True
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)


def _monitor_of(task_cls: type | None) -> tuple[str, str]:
    monitor = getattr(task_cls, "monitor", "val_loss") if task_cls is not None else "val_loss"
    mode = getattr(task_cls, "monitor_mode", "min") if task_cls is not None else "min"
    return monitor, mode


def default_callbacks(run_dir: str | os.PathLike, task_cls: type | None = None) -> list[Callback]:
    """``last.ckpt`` + best checkpoint under ``run_dir/checkpoints``, the task-class recorder,
    :class:`StopOnNonFinite` (stop at the first NaN/inf loss or gradient), validation at the last
    step of a run cut by ``max_steps``, progress lines when there is no progress bar, and the
    continuation of the run's logs on a resume (see :func:`default_loggers`)."""
    monitor, mode = _monitor_of(task_cls)
    ckpt = BestAndLastCheckpoint(
        dirpath=Path(run_dir) / "checkpoints",
        filename="best-{step}",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_last=True,
    )
    guard = StopOnNonFinite()
    guard._default = True  # stands aside for a StopOnNonFinite that the recipe lists
    progress = ProgressLines()
    progress._default = True  # likewise
    return [ckpt, TaskClassPath(), guard, ValidateAtMaxSteps(), progress, ContinueLogs()]


def _fit_version(folder: Path) -> int | None:
    """The latest ``version_N`` in ``folder`` (a run's ``csv/``) written by a fit: a version whose
    ``metrics.csv`` has no ``train_*`` or ``val_*`` column was written by ``test`` (or ``predict``)
    and is skipped; so is nothing else (a fit stopped before its first log has no metrics.csv)."""
    versions = sorted((int(p.name[len("version_"):]) for p in folder.glob("version_*")
                       if p.is_dir() and p.name[len("version_"):].isdigit()), reverse=True)
    for v in versions:
        metrics = folder / f"version_{v}" / "metrics.csv"
        if metrics.is_file():
            with open(metrics, newline="") as f:
                columns = [c for c in next(csv.reader(f), []) if c not in ("epoch", "step")]
            if not any(c.startswith(("train_", "val_")) for c in columns):
                continue
        return v
    return None


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to the ``metrics.csv`` already in its folder (Lightning's
    deletes it) with that file's columns."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:
        pass  # the folder of the run being continued: kept

    def drop_from(self, step: int) -> int:
        """Remove the rows logged at ``step`` or later (by a run interrupted after its last
        checkpoint, which the resumed run logs again); returns how many."""
        if not self._fs.isfile(self.metrics_file_path):
            return 0
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or []), list(reader)

        def before(row: dict) -> bool:
            try:
                return float(row.get("step") or 0) < step
            except ValueError:
                return True

        kept = [r for r in rows if before(r)]
        if len(kept) < len(rows):
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)
        return len(rows) - len(kept)


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger; with ``append=True`` it writes into the latest ``version_N`` of a
    fit (not one written by ``test``; a new version if there is none) and appends to its
    ``metrics.csv`` instead of starting a new version, so that a resumed run's metrics continue the
    run's file."""

    def __init__(self, save_dir: str | os.PathLike, name: str = "csv", version: int | str | None = None,
                 append: bool = False, **kwargs: Any) -> None:
        if append and version is None:
            version = _fit_version(Path(save_dir) / name)
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)
        self.append = append

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = (_AppendingWriter if self.append else ExperimentWriter)(log_dir=self.log_dir)
        return self._experiment


class ContinueLogs(Callback):
    """On a fit resumed from a checkpoint, cuts the appended logs of :func:`default_loggers`
    (``append=True``) at the checkpoint's step: CSV rows logged at that step or later are removed,
    and TensorBoard hides its events from that step on (``purge_step``). Other loggers, and
    loggers that start a new version, are left alone.

    It also keeps the logged step of a resumed run equal to that of an uninterrupted one: Lightning
    restores its logging counter one short when the checkpoint was written at a validation (as
    ``last.ckpt`` is), so the resumed run's rows would be logged at step N-1 for step N."""

    _check_step = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        from hypernetworks.callbacks import _fn

        step = checkpoint.get("global_step")
        if _fn(trainer) != "fit" or not isinstance(step, int):
            return
        self._check_step = True
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, RunCSVLogger) and logger.append:
                dropped = logger.experiment.drop_from(step)
                if dropped:
                    log.info("%s: removed %d row(s) logged after step %d by the interrupted run",
                             logger.experiment.metrics_file_path, dropped, step)
            elif isinstance(logger, TensorBoardLogger) and getattr(logger, "_append", False) \
                    and getattr(logger, "_experiment", None) is None and isinstance(getattr(logger, "_kwargs", None), dict):
                logger._kwargs["purge_step"] = step

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if not self._check_step:
            return
        self._check_step = False
        loop = getattr(trainer.fit_loop, "epoch_loop", None)
        stepped = getattr(loop, "_batches_that_stepped", None)
        # one optimizer step per stepping batch (automatic optimization): the counts agree
        if pl_module.automatic_optimization and isinstance(stepped, int) and stepped == trainer.global_step - 1:
            loop._batches_that_stepped = trainer.global_step


def default_loggers(run_dir: str | os.PathLike, append: bool = False) -> list:
    """CSV and TensorBoard loggers sharing ``run_dir`` (``csv/version_N``, ``tb/version_N``).

    A new run starts a new ``version_N``. ``append=True`` (a resumed run: the command line sets it
    for ``fit --ckpt_path last`` or a checkpoint in the run's own folder) continues the latest
    version of a fit instead (versions written by ``test`` are skipped), so that its ``metrics.csv`` and TensorBoard folder hold the whole run; with
    :class:`ContinueLogs` (a default callback) what was logged after the checkpoint is dropped."""
    csv_logger = RunCSVLogger(save_dir=str(run_dir), name="csv", append=append)
    # TensorBoard continues the folder of the same number (both loggers start a version per run)
    version = csv_logger._version if append else None
    tb_append = isinstance(version, int) and (Path(run_dir) / "tb" / f"version_{version}").is_dir()
    tb = TensorBoardLogger(save_dir=str(run_dir), name="tb", version=version if tb_append else None,
                           default_hp_metric=False)
    tb._append = tb_append
    return [csv_logger, tb]


def make_trainer(
    run_dir: str | os.PathLike,
    task_cls: type | None = None,
    *,
    callbacks: list[Callback] | None = None,
    logger: Any = None,
    **trainer_kwargs: Any,
) -> Trainer:
    """A Trainer with the project's defaults (for programs such as ``hypernetworks demo`` that do
    not go through the YAML command line). ``logger=None`` means CSV + TensorBoard in ``run_dir``."""
    trainer_kwargs.setdefault("default_root_dir", str(run_dir))
    trainer_kwargs.setdefault("plugins", [AtomicCheckpointIO()])
    return Trainer(
        callbacks=[*default_callbacks(run_dir, task_cls), *(callbacks or [])],
        logger=default_loggers(run_dir) if logger is None else logger,
        **trainer_kwargs,
    )


def _plain_help(format_help: Any) -> Any:
    """``--help`` as plain text: Lightning's docstrings bring reST markup (````"auto"````, :class:`X`)."""

    def plain() -> str:
        text = re.sub(r":(?:class|func|meth|attr|mod|obj):`~?([^`]+)`", r"\1", format_help())
        return re.sub(r"``([^`]*)``", r"\1", text)

    return plain


class HypernetworksCLI(LightningCLI):
    """LightningCLI plus run directory, default loggers/checkpoints and atomic checkpoint writes.

    Before running a subcommand it calls the data module's ``check_data()`` when it has one (the
    project's data modules do): missing dataset files raise
    :class:`~hypernetworks.data.root.DataNotFoundError` before anything is written, and a run
    folder this invocation created is removed again if that error comes later.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except Exception:
            # a run folder this invocation created, with nothing trained into it (no checkpoint), is
            # removed again: missing data, a refused checkpoint, bad settings leave nothing behind
            run_dir = getattr(self, "run_dir", None)
            if getattr(self, "_new_run_dir", False) and run_dir is not None and run_dir.is_dir() \
                    and not any(run_dir.rglob("*.ckpt")):
                import shutil

                shutil.rmtree(run_dir, ignore_errors=True)
            raise

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        # argparse prints the usage before every error; the generated one lists every option (~50 lines)
        self.parser.usage = "%(prog)s {fit,validate,test,predict} --config RECIPE.yaml [--key VALUE ...]"
        from hypernetworks.cli import TRAINING_COMMANDS

        for name, sub in getattr(self, "_subcommand_parsers", {}).items():
            sub.usage = "%(prog)s --config RECIPE.yaml [--key VALUE ...]"
            if name in TRAINING_COMMANDS:
                sub.description = TRAINING_COMMANDS[name][:1].upper() + TRAINING_COMMANDS[name][1:] + "."
            sub.format_help = _plain_help(sub.format_help)

    def _check_data(self) -> None:
        check = getattr(self.datamodule, "check_data", None)
        if callable(check):
            check()

    def before_fit(self) -> None:
        self._check_data()

    def before_validate(self) -> None:
        self._check_data()

    def before_test(self) -> None:
        self._check_data()

    def before_predict(self) -> None:
        self._check_data()

    def _parse_ckpt_path(self) -> None:
        # LightningCLI feeds a local --ckpt_path file's saved settings back through jsonargparse,
        # which decodes strings (JSON escapes, YAML tags) into class specs and builds them, and lets
        # the file's task class replace the recipe's. Here the file is read like every checkpoint
        # (CRC, no pickle), its settings are data checked against the recipe's task signature
        # (hypernetworks.checkpoints.checkpoint_settings), a file of another task class is refused,
        # and instantiate_classes rebuilds the task with them by the project's own code.
        self._ckpt_settings = None
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return  # "last", "best", URLs: only their weights and state are read, at fit/test time
        source = str(ckpt_path)
        ckpt = read_checkpoint(ckpt_path)
        hparams = ckpt.get("hyper_parameters") or {}
        if not isinstance(hparams, dict):
            raise CheckpointError(f"{source}: 'hyper_parameters' is a {type(hparams).__name__}, not a dict")
        hparams = dict(hparams)
        saved_class = hparams.pop("_class_path", None) or ckpt.get(TASK_CLASS_KEY)
        hparams.pop("_instantiator", None)
        check_settings({"class_path": saved_class, "init_args": hparams} if saved_class else hparams, source,
                       where="model")
        model_cfg = self.config[sub].get("model")
        recipe_class = getattr(model_cfg, "class_path", None) if model_cfg is not None else None
        if saved_class and recipe_class and saved_class != recipe_class:
            raise CheckpointError(f"{source} is a checkpoint of {saved_class}, but the recipe trains {recipe_class}; "
                                  "use the recipe that wrote it (its run folder holds config.yaml)")
        if not recipe_class or not hparams:
            return
        self._ckpt_settings = checkpoint_settings(_import_class(recipe_class), hparams, source)
        self._ckpt_source = source
        self._ckpt_weights = ckpt.get("state_dict") or {}

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        settings = getattr(self, "_ckpt_settings", None)
        if not settings:
            return
        current = dict(getattr(self.model, "hparams", {}) or {})
        changed = {k: v for k, v in settings.items() if k not in current or current[k] != v}
        weights, self._ckpt_weights = self._ckpt_weights, None  # the trainer loads them again itself
        if not changed:
            return
        cls, source = type(self.model), self._ckpt_source
        merged = {**current, **settings}
        check_weights_fit(cls, merged, weights, source)
        self.model = build_from_settings(cls, merged, source=source)
        # config.yaml of the run (written at setup from self.config) says what was built
        init_args = getattr(self.config[self.subcommand].model, "init_args", None)
        if init_args is not None:
            for k, v in changed.items():
                init_args[k] = v

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="run directory name (default: the config file's stem, else the task class)")
        parser.add_argument("--runs_root", type=str, default="runs", help="folder holding run directories")

    def _cfg(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        task_cls = None
        model_cfg = cfg.get("model")
        class_path = getattr(model_cfg, "class_path", None) if model_cfg is not None else None
        if class_path:
            task_cls = _import_class(class_path)
        name = cfg.get("run_name")
        if not name:
            configs = cfg.get("config") or []
            name = Path(str(configs[-1])).stem if configs else (
                task_cls.__name__.lower() if task_cls is not None else "run")
        run_dir = Path(cfg.get("runs_root") or "runs") / name
        self.run_dir = run_dir
        self._new_run_dir = not run_dir.exists()
        trainer_cfg = cfg["trainer"]
        if trainer_cfg.get("default_root_dir") in (None, "", os.getcwd()):
            trainer_cfg["default_root_dir"] = str(run_dir)
        self._default_logger = trainer_cfg.get("logger") in (None, True)
        self._default_plugins = not trainer_cfg.get("plugins")
        # trainer_defaults["callbacks"] are appended to whatever the recipe lists
        self.trainer_defaults["callbacks"] = default_callbacks(run_dir, task_cls)

    def _resumes_run(self) -> bool:
        """``fit`` from this run's own checkpoint (``--ckpt_path last``, or a file of its
        ``checkpoints/``): the run's logs are continued, not started again in a new version."""
        if self.subcommand != "fit":
            return False
        ckpt_path = self._cfg().get("ckpt_path")
        folder = Path(self.run_dir) / "checkpoints"
        if ckpt_path == "last":
            return any(folder.glob("last*.ckpt"))
        if not ckpt_path or "://" in str(ckpt_path) or not Path(ckpt_path).is_file():
            return False
        return Path(ckpt_path).resolve().parent == folder.resolve()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if getattr(self, "_default_logger", False):
            kwargs.setdefault("logger", default_loggers(self.run_dir, append=self._resumes_run()))
        if getattr(self, "_default_plugins", False):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)


def _config_paths(args: list[str]) -> list[str]:
    """The values of ``--config X`` / ``--config=X`` / ``-c X`` that look like file names."""
    found = []
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--config="):
            value = a.split("=", 1)[1]
        else:
            continue
        if value.endswith((".yaml", ".yml", ".json")) and "\n" not in value:
            found.append(value)
    return found


def _missing_config_message(path: str) -> str:
    import difflib

    folder = Path(path).parent
    names = sorted(p.name for p in folder.glob("*.y*ml")) if folder.is_dir() else []
    close = difflib.get_close_matches(Path(path).name, names, n=3, cutoff=0.6)
    if close:
        hint = f"; did you mean {', '.join(str(folder / c) for c in close)}?"
    elif names:
        hint = f" ({len(names)} recipes in {folder}/)"
    else:
        hint = f" (no folder {folder}/ under {Path.cwd()})"
    return f"config file not found: {path}{hint}"


def run_cli(args: list[str] | None = None, run: bool = True) -> HypernetworksCLI:
    """Run (or, with ``run=False``, only build) the training command line.

    ``args`` defaults to ``sys.argv[1:]``. Missing dataset files, a missing ``--config`` file, a
    refused or damaged checkpoint, a damaged data file, bad saved settings and a full disk end the
    program with one paragraph on stderr and a non-zero exit (``SystemExit``), no traceback
    (``HYPERNETWORKS_DEBUG=1`` shows it; see :mod:`hypernetworks._errors`); so does a run stopped by
    :class:`StopOnNonFinite` (its :class:`NonFiniteError` message, naming the step; exit status 1).
    Progress bars are on only when stdout and stderr are terminals (``--trainer.enable_progress_bar``
    overrides that); otherwise a progress line is printed every 30 s or so. Lightning's banner lines
    and its warning about its own use of torch are silenced (:func:`hypernetworks._console.quiet_lightning`).
    """
    import sys

    from hypernetworks._console import interactive, quiet_lightning
    from hypernetworks._errors import debug, paragraph, user_message

    argv = list(sys.argv[1:] if args is None else args)
    prog = f"hypernetworks {argv[0]}" if argv and not argv[0].startswith("-") else "hypernetworks"
    for path in _config_paths(argv):
        if not Path(path).is_file():
            print(f"{prog}: {_missing_config_message(path)}", file=sys.stderr)
            raise SystemExit(2)
    quiet_lightning()  # no banner, no advertising, no warning about Lightning's own use of torch
    # LightningCLI reads sys.argv when args is None and warns (echoing both) when it gets args while
    # sys.argv holds others; argv *is* the command line here, and DDP's launcher re-runs sys.argv
    saved = sys.argv
    sys.argv = [saved[0] if saved else "hypernetworks", *argv]
    try:
        return HypernetworksCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=None,
            run=run,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"enable_progress_bar": interactive()},
        )
    except NonFiniteError as e:
        print(f"{prog}: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:
        message = user_message(e)
        if message is None or debug():
            raise
        print(paragraph(prog, message), file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        sys.argv = saved


# ----------------------------------------------------------------------------- loading


def _import_class(class_path: str) -> type:
    """The class named in a recipe (the user's own command line, not a checkpoint)."""
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"class path {class_path!r} is not of the form 'package.module.Class'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"class path {class_path!r}: module {module_name!r} has no {name!r}") from None


def load_task(checkpoint_path: str | os.PathLike, map_location: Any = "cpu", *,
              trusted_classes: Iterable[type] = ()) -> LightningModule:
    """Rebuild the LightningModule saved in ``checkpoint_path`` and load its weights (eval mode).

    The class comes from the ``_class_path`` that LightningCLI stores in the hyperparameters (or
    from the class path the project's default callbacks add); its constructor gets the saved
    hyperparameters. Nothing in the file can run code (see :mod:`hypernetworks.checkpoints`): the
    archive is CRC-checked, read with ``torch.load(weights_only=True)``, and the task class and any
    nested ``class_path`` in its settings must be one of the project's own classes or one of
    ``trusted_classes`` (class objects, for tasks defined outside the package); this is checked
    before anything is imported. Errors are ``FileNotFoundError`` or ``ValueError`` naming the file.
    """
    name = os.fspath(checkpoint_path)
    ckpt = read_checkpoint(checkpoint_path, map_location=map_location)
    hparams = ckpt.get("hyper_parameters") or {}
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{name}: 'hyper_parameters' is a {type(hparams).__name__}, not a dict")
    hparams = dict(hparams)
    class_path = hparams.pop("_class_path", None) or ckpt.get(TASK_CLASS_KEY)
    hparams.pop("_instantiator", None)  # LightningCLI's own bookkeeping, never imported here
    if not class_path:
        raise CheckpointError(f"{name} does not record its task class (no '_class_path' hyperparameter)")
    trusted = tuple(trusted_classes)
    check_settings({"class_path": class_path, "init_args": hparams}, name, trusted, where="task")
    cls = resolve_trusted_class(class_path, trusted, name)
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise CheckpointError(f"{class_path!r} from {name} is not a LightningModule")
    state_dict = ckpt["state_dict"]
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{name}: 'state_dict' is a {type(state_dict).__name__}, not a dict")
    settings = checkpoint_settings(cls, hparams, name, trusted)
    check_weights_fit(cls, settings, state_dict, name, trusted)
    try:
        task = build_from_settings(cls, settings, source=name, trusted=trusted)
        task.on_load_checkpoint(ckpt)
        task.load_state_dict(state_dict)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        # the settings or weights of a damaged or foreign file, found while building: one paragraph
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{name}: its saved settings and weights do not load into {cls.__name__}: "
                              f"{type(e).__name__}: {first[:300]}") from None
    return task.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()

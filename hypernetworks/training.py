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
  killed while saving never leaves a truncated ``last.ckpt``;
* the task's class path stored in every checkpoint, so :func:`load_task` rebuilds any task;
* ``seed_everything: 0`` and Lightning's TQDM progress bar.

Tasks may declare class attributes ``monitor = "val_loss"`` and ``monitor_mode = "min"`` to choose
the metric of the "best" checkpoint; a metric that is never logged only disables the best checkpoint.
"""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = [
    "AtomicCheckpointIO",
    "BestAndLastCheckpoint",
    "TaskClassPath",
    "HypernetworksCLI",
    "default_callbacks",
    "default_loggers",
    "make_trainer",
    "load_task",
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
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


class TaskClassPath(Callback):
    """Stores ``module.Class`` of the LightningModule in every checkpoint (for :func:`load_task`
    when the task was built without LightningCLI, which otherwise records ``_class_path``)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        cls = type(pl_module)
        checkpoint[TASK_CLASS_KEY] = f"{cls.__module__}.{cls.__qualname__}"


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps ``last.ckpt`` and the best by ``monitor``; if the monitored
    metric is never logged it warns once and keeps only ``last.ckpt`` instead of failing the run."""

    _warned = False

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
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
    """``last.ckpt`` + best checkpoint under ``run_dir/checkpoints`` and the task-class recorder."""
    monitor, mode = _monitor_of(task_cls)
    ckpt = BestAndLastCheckpoint(
        dirpath=Path(run_dir) / "checkpoints",
        filename="best-{step}",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_last=True,
    )
    return [ckpt, TaskClassPath()]


def default_loggers(run_dir: str | os.PathLike) -> list:
    """CSV and TensorBoard loggers sharing ``run_dir`` (``csv/version_N``, ``tb/version_N``)."""
    return [
        CSVLogger(save_dir=str(run_dir), name="csv"),
        TensorBoardLogger(save_dir=str(run_dir), name="tb", default_hp_metric=False),
    ]


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


class HypernetworksCLI(LightningCLI):
    """LightningCLI plus run directory, default loggers/checkpoints and atomic checkpoint writes."""

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
        trainer_cfg = cfg["trainer"]
        if trainer_cfg.get("default_root_dir") in (None, "", os.getcwd()):
            trainer_cfg["default_root_dir"] = str(run_dir)
        self._default_logger = trainer_cfg.get("logger") in (None, True)
        self._default_plugins = not trainer_cfg.get("plugins")
        # trainer_defaults["callbacks"] are appended to whatever the recipe lists
        self.trainer_defaults["callbacks"] = default_callbacks(run_dir, task_cls)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if getattr(self, "_default_logger", False):
            kwargs.setdefault("logger", default_loggers(self.run_dir))
        if getattr(self, "_default_plugins", False):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)


def run_cli(args: list[str] | None = None, run: bool = True) -> HypernetworksCLI:
    return HypernetworksCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )


# ----------------------------------------------------------------------------- loading

_TRUSTED_PREFIXES = ("hypernetworks.",)


def _import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"class path {class_path!r} is not of the form 'package.module.Class'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"class path {class_path!r}: module {module_name!r} has no {name!r}") from None


def load_task(checkpoint_path: str | os.PathLike, map_location: Any = "cpu") -> LightningModule:
    """Rebuild the LightningModule saved in ``checkpoint_path`` and load its weights (eval mode).

    The class comes from the ``_class_path`` that LightningCLI stores in the hyperparameters (or
    from the class path the project's default callbacks add); its constructor gets the saved
    hyperparameters. The file is read with ``torch.load(weights_only=True)`` (no pickle), and only
    classes of the ``hypernetworks`` package or of modules already imported are built.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding pickled objects
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    class_path = hparams.pop("_class_path", None) or ckpt.get(TASK_CLASS_KEY)
    hparams.pop("_instantiator", None)
    if not class_path:
        raise ValueError(f"{path} does not record its task class (no '_class_path' hyperparameter)")
    module_name = class_path.rpartition(".")[0]
    if not class_path.startswith(_TRUSTED_PREFIXES) and module_name not in sys.modules:
        raise ValueError(
            f"{path} asks for class {class_path!r} outside the hypernetworks package; import its module "
            "first if you trust the checkpoint")
    cls = _import_class(class_path)
    if not (isinstance(cls, type) and issubclass(cls, LightningModule)):
        raise ValueError(f"{class_path!r} from {path} is not a LightningModule")
    task = _instantiate(cls, hparams)
    task.on_load_checkpoint(ckpt)
    task.load_state_dict(ckpt["state_dict"])
    return task.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def _instantiate(cls: type, hparams: dict[str, Any]):
    """Build ``cls(**hparams)`` through jsonargparse so nested ``class_path`` arguments work too."""
    import inspect

    from jsonargparse import ArgumentParser

    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        hparams = {k: v for k, v in hparams.items() if k in params}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "task", fail_untyped=False)
    cfg = parser.parse_object({"task": hparams})
    return parser.instantiate_classes(cfg).task

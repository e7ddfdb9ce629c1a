"""Small Lightning callbacks used by the recipes.

``WallClock`` logs the training wall time so far (``wall_s``) with every validation, so that
learning curves can be drawn against time as well as steps; it is kept in the checkpoint, so a
resumed run continues the count instead of restarting it.

``ProgressLines`` prints a line now and then (step, loss, elapsed, time left) when there is no
progress bar, as when the output goes to a file or a pipe; ``ValidateAtMaxSteps`` validates (and so
checkpoints) at the last step of a run cut by ``max_steps`` between two validations. Both are among
the defaults of every run (:func:`hypernetworks.training.default_callbacks`).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import torch
from lightning.pytorch import Callback


class WallClock(Callback):
    """Logs ``wall_s``: seconds spent in fitting (training and validation) so far, across resumes."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._since: float | None = None

    def _now(self) -> float:
        return self.elapsed + (time.monotonic() - self._since if self._since is not None else 0.0)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._since = time.monotonic()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.elapsed, self._since = self._now(), None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            pl_module.log("wall_s", self._now())

    def state_dict(self) -> dict:
        return {"elapsed": self._now()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.elapsed = float(state_dict.get("elapsed", 0.0))


def _fn(trainer) -> str:
    """"fit", "validate", "test" or "predict": what the trainer was asked to do."""
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return str(getattr(fn, "value", fn) or "")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLines(Callback):
    """Prints a progress line every ``every_s`` seconds while fitting, validating, testing or
    predicting, when the trainer shows no progress bar (the command line turns the bars off when
    its output is not a terminal; they would write every frame into the file)::

        fit: step 1200/4000 (30%), loss 1.912, val_bpc 2.731, elapsed 5m02s, left ~11m45s
        test: batch 40/117 (34%), elapsed 1m00s, left ~1m56s

    ``loss`` is the mean training loss of the steps since the previous line; the ``val_*`` values
    are those of the latest validation; the time left is extrapolated from this run's pace so far
    (validation included). On long runs the lines are spaced to a tenth of the elapsed time, so a
    run of hours writes tens of lines, not thousands. A run shorter than ``every_s`` prints
    nothing; one that printed a line ends with a last one. ``label`` starts each line (default: the
    stage, ``fit``, ``test``, ...). Lines go to stdout (``file``), from rank zero only.

    Part of :func:`hypernetworks.training.default_callbacks`; an instance listed in a recipe replaces
    the default one.
    """

    def __init__(self, every_s: float = 30.0, label: str | None = None, file: TextIO | None = None) -> None:
        if not every_s >= 0:
            raise ValueError(f"every_s must be >= 0, got {every_s}")
        self.every_s = float(every_s)
        self.label = label
        self.file = file
        self._default = False  # set by default_callbacks
        self._active = False
        self._reset()

    def _reset(self) -> None:
        self._t0: float | None = None
        self._next = math.inf
        self._printed = 0
        self._step0 = 0
        self._loss_sum: torch.Tensor | None = None
        self._loss_n = 0
        self._batches = 0

    # ------------------------------------------------------------------ when
    def setup(self, trainer, pl_module, stage: str) -> None:
        stands_aside = self._default and any(
            isinstance(c, ProgressLines) and not c._default for c in trainer.callbacks)
        self._active = (not stands_aside and trainer.progress_bar_callback is None
                        and getattr(trainer, "is_global_zero", True))

    def _start(self, trainer) -> None:
        self._reset()
        self._t0 = time.monotonic()
        self._next = self._t0 + self.every_s
        self._step0 = trainer.global_step

    def _due(self) -> bool:
        if not self._active or self._t0 is None:
            return False
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + max(self.every_s, 0.1 * (now - self._t0))
        return True

    def _print(self, trainer, text: str) -> None:
        name = self.label or _fn(trainer) or "run"
        print(f"{name}: {text}", file=self.file or sys.stdout, flush=True)
        self._printed += 1

    # ------------------------------------------------------------------ what
    def _fit_total(self, trainer) -> float:
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:  # an iterable data set without a length, for instance
            total = math.inf
        if trainer.max_steps is not None and trainer.max_steps > 0:
            total = min(total, float(trainer.max_steps))
        return total

    def _fit_line(self, trainer, validating: str = "") -> str:
        elapsed = time.monotonic() - self._t0
        step, total = trainer.global_step, self._fit_total(trainer)
        parts = [f"step {step}/{int(total)} ({100 * step / total:.0f}%)" if math.isfinite(total) and total > 0
                 else f"step {step}"]
        if validating:
            parts.append(validating)
        if self._loss_sum is not None and self._loss_n:
            loss = (self._loss_sum / self._loss_n).item()
            parts.append(f"loss {loss:.4g}")
            self._loss_sum, self._loss_n = None, 0
        metrics = trainer.callback_metrics
        for key in sorted(k for k in metrics if k.startswith("val_"))[:3]:
            value = metrics[key]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                parts.append(f"{key} {value.item():.4g}")
        parts.append(f"elapsed {_duration(elapsed)}")
        done = step - self._step0
        if done > 0 and math.isfinite(total) and total > step:
            parts.append(f"left ~{_duration(elapsed / done * (total - step))}")
        return ", ".join(parts)

    def _eval_total(self, trainer, stage: str) -> float:
        counts = {"validate": "num_val_batches", "test": "num_test_batches",
                  "predict": "num_predict_batches"}.get(stage)
        try:
            return float(sum(getattr(trainer, counts))) if counts else math.inf
        except Exception:
            return math.inf

    def _eval_line(self, trainer, stage: str) -> str:
        elapsed = time.monotonic() - self._t0
        done, total = self._batches, self._eval_total(trainer, stage)
        parts = [f"batch {done}/{int(total)} ({100 * done / total:.0f}%)" if math.isfinite(total) and total > 0
                 else f"batch {done}"]
        parts.append(f"elapsed {_duration(elapsed)}")
        if done > 0 and math.isfinite(total) and total > done:
            parts.append(f"left ~{_duration(elapsed / done * (total - done))}")
        return ", ".join(parts)

    # ------------------------------------------------------------------ fit
    def on_fit_start(self, trainer, pl_module) -> None:
        self._start(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._step0 = trainer.global_step  # after a resume: the steps of this session set the pace

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._active:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach().float()  # stays on the device: no synchronisation per step
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_n += 1
        if self._due():
            self._print(trainer, self._fit_line(trainer))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._active and self._printed:
            self._print(trainer, "done, " + self._fit_line(trainer))
        self._t0 = None

    # ------------------------------------------------------------------ validate, test, predict
    def _eval_batch_end(self, trainer, stage: str) -> None:
        if not self._active or trainer.sanity_checking:
            return
        self._batches += 1
        if self._due():
            if _fn(trainer) == "fit":
                total = self._eval_total(trainer, "validate")
                where = f"validating (batch {self._batches}/{int(total)})" if math.isfinite(total) \
                    else f"validating (batch {self._batches})"
                self._print(trainer, self._fit_line(trainer, where))
            else:
                self._print(trainer, self._eval_line(trainer, stage))

    def _eval_end(self, trainer, stage: str) -> None:
        if _fn(trainer) == "fit":
            self._batches = 0  # the next validation counts from its first batch
            return
        if self._active and self._printed:
            self._print(trainer, "done, " + self._eval_line(trainer, stage))
        self._t0 = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if _fn(trainer) == "fit":
            self._batches = 0
        else:
            self._start(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_end(trainer, "validate")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._eval_end(trainer, "validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._start(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_end(trainer, "test")

    def on_test_end(self, trainer, pl_module) -> None:
        self._eval_end(trainer, "test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._start(trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_end(trainer, "predict")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._eval_end(trainer, "predict")


class ValidateAtMaxSteps(Callback):
    """Validates at the last step of a run that ``max_steps`` ends between two validations.

    With ``max_steps: 400`` and ``val_check_interval: 200`` the last validation is at step 400; a
    trial cut to ``--trainer.max_steps 50`` would otherwise end without any validation, so without
    a metric and without a best checkpoint. At the step that reaches ``max_steps`` this callback asks
    the trainer to stop (``trainer.should_stop``), which makes Lightning validate before leaving,
    and the checkpoint callback saves ``last.ckpt`` and the best as at every validation. A run whose
    last step falls on a validation anyway validates once, as before.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        max_steps = trainer.max_steps
        if max_steps is not None and max_steps > 0 and trainer.global_step >= max_steps:
            trainer.should_stop = True

"""Small Lightning callbacks used by the recipes.

``WallClock`` logs the training wall time so far (``wall_s``) with every validation, so that
learning curves can be drawn against time as well as steps; it is kept in the checkpoint, so a
resumed run continues the count instead of restarting it.
"""
from __future__ import annotations

import time

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

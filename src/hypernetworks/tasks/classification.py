"""Image classification as a LightningModule: any registered model, cross-entropy, accuracy.

    model: {class_path: hypernetworks.tasks.classification.ImageClassifier,
            init_args: {model: hyper-wrn-40-2, lr: 0.002, lr_milestones: [168000, 336000, 504000],
                        lr_values: [0.002, 0.001, 0.0002, 0.00005]}}

The paper's CIFAR schedule is a piecewise-constant learning rate changed at given *steps*
(``lr_milestones``, with ``lr_values`` one longer); without milestones the rate is constant.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch import LightningModule
from torch import Tensor

from hypernetworks.models.registry import create_model


class ImageClassifier(LightningModule):
    """Cross-entropy training of ``create_model(model, **model_args)``.

    Args:
        model: a registered model name (see ``hypernetworks.list_models()``).
        model_args: keyword overrides for the model factory.
        optimizer: "adam" (the paper's) or "sgd" (momentum 0.9, Nesterov).
        lr: initial learning rate (ignored when ``lr_values`` is given).
        lr_milestones: steps at which the learning rate changes (increasing).
        lr_values: the rate before the first milestone and after each one (len(milestones) + 1).
        weight_decay: L2 penalty added to the loss on every parameter with dim > 1 ("small L2").
        num_classes: for the accuracy metrics.
    """

    monitor, monitor_mode = "val_acc", "max"  # used by the project's best-checkpoint callback

    def __init__(self, model: str = "mnist-hyper", model_args: dict[str, Any] | None = None, optimizer: str = "adam",
                 lr: float = 1e-3, lr_milestones: list[int] | None = None, lr_values: list[float] | None = None,
                 weight_decay: float = 0.0, num_classes: int = 10) -> None:
        super().__init__()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        milestones = list(lr_milestones or [])
        if lr_values is not None and len(lr_values) != len(milestones) + 1:
            raise ValueError(f"lr_values needs len(lr_milestones) + 1 = {len(milestones) + 1} entries, "
                             f"got {len(lr_values)}")
        if lr_values is None and milestones:
            raise ValueError("lr_milestones needs lr_values (the rate before and after each milestone)")
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"lr_milestones must increase, got {milestones}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.save_hyperparameters()
        self.model = create_model(model, **(model_args or {}))
        metric = lambda: torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")  # noqa: E731
        self.train_acc, self.val_acc, self.test_acc = metric(), metric(), metric()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _l2(self) -> Tensor:
        return sum((p.pow(2).sum() for p in self.model.parameters() if p.dim() > 1), torch.zeros((), device=self.device))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=False)
        if self.hparams.weight_decay:
            loss = loss + 0.5 * self.hparams.weight_decay * self._l2()
        return loss

    def _eval_step(self, batch, stage: str, acc: torchmetrics.Metric) -> None:
        x, y = batch
        logits = self(x)
        acc(logits, y)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log(f"{stage}_acc", acc, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def on_test_epoch_end(self) -> None:
        self.log("test_error", 1.0 - self.test_acc.compute())

    def configure_optimizers(self):
        hp = self.hparams
        values = hp.lr_values or [hp.lr]
        if hp.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=values[0])
        else:
            opt = torch.optim.SGD(self.parameters(), lr=values[0], momentum=0.9, nesterov=True)
        if not hp.lr_milestones:
            return opt
        milestones = list(hp.lr_milestones)

        def factor(step: int) -> float:  # piecewise constant, relative to the first value
            return values[sum(step >= m for m in milestones)] / values[0]

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

"""Handwriting generation task: masked mixture-density NLL over IAM-OnDB pen offsets.

Metrics follow the paper (and Graves 2013): ``val_loss`` is the validation log-loss in nats summed
over each sequence and averaged over sequences, computed on the *normalised* offsets the model sees
(see docs/handwriting.md for what that means for comparing numbers). ``val_nll_per_step`` is the
same in nats per predicted point, which does not depend on how long (or truncated) the lines are.
"""
from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric

from hypernetworks.models.registry import create_model
from hypernetworks.models.handwriting import HandwritingMDN, mdn_nll


class HandwritingTask(LightningModule):
    """Train / score / sample a :class:`~hypernetworks.models.handwriting.HandwritingMDN`.

    Args:
        model: a registered name (``iam-lstm-900``, ``iam-hyperlstm-900``, ... see ``list_models("iam-*")``).
        model_overrides: keyword overrides for the model factory (e.g. ``{hidden_size: 128}``).
        lr: Adam learning rate (the paper: 1e-4; clip gradients with ``trainer.gradient_clip_val``).
        sample_bias: default sampling bias for :meth:`generate` / :meth:`demo_generate`.
    """

    def __init__(self, model: str = "iam-lstm-900", model_overrides: dict | None = None, lr: float = 1e-4,
                 sample_bias: float = 0.0):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.model: HandwritingMDN = create_model(model, **(model_overrides or {}))
        if not isinstance(self.model, HandwritingMDN):
            raise ValueError(f"model {model!r} is not a handwriting model (use one of the iam-* names)")
        # Training-split normalisation statistics: saved in the checkpoint so samples can be turned
        # back into pen units without the dataset.
        self.register_buffer("offset_mean", torch.zeros(2))
        self.register_buffer("offset_std", torch.ones(2))
        self.val_seq = MeanMetric()
        self.val_step = MeanMetric()

    # ----------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        stats = getattr(dm, "stats", None)
        if stats is not None and stage == "fit":
            self.offset_mean.copy_(torch.tensor(stats["mean"]))
            self.offset_std.copy_(torch.tensor(stats["std"]))

    def sequence_nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence summed NLL (B,) and per-step NLL (B, T) with padding zeroed."""
        params, _ = self.model(batch["inputs"])
        nll = mdn_nll(params, batch["targets"]) * batch["mask"]
        return nll.sum(1), nll

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        seq, _ = self.sequence_nll(batch)
        steps = batch["mask"].sum()
        loss = seq.sum() / steps  # per-point mean: the optimum is the same, the scale does not grow with T
        self.log("train_nll_per_step", loss, prog_bar=True, batch_size=len(seq))
        self.log("train_loss", seq.mean(), batch_size=len(seq))
        return loss

    def _eval_step(self, batch: dict, prefix: str) -> None:
        seq, nll = self.sequence_nll(batch)
        self.val_seq.update(seq)
        self.val_step.update(nll[batch["mask"]])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.log("val_loss", self.val_seq.compute(), prog_bar=True)
        self.log("val_nll_per_step", self.val_step.compute(), prog_bar=True)
        self.val_seq.reset()
        self.val_step.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log("test_loss", self.val_seq.compute())
        self.log("test_nll_per_step", self.val_step.compute())
        self.val_seq.reset()
        self.val_step.reset()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    # ----------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, length: int = 700, bias: float | None = None, temperature: float = 1.0, seed: int = 0,
                 activity: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sample ``length`` pen steps in raw pen units: ``(steps (length, 3), intensity (length, 4) | None)``.

        Deterministic under ``seed`` (a private generator; the global RNG is untouched).
        """
        was_training = self.training
        self.eval()
        try:
            g = torch.Generator(device=self.offset_mean.device).manual_seed(int(seed))
            bias = self.hparams.sample_bias if bias is None else bias
            steps, intensity = self.model.sample(length, bias=bias, temperature=temperature, generator=g,
                                                 activity=activity)
        finally:
            self.train(was_training)
        steps = steps.clone()
        steps[:, :2] = steps[:, :2] * self.offset_std + self.offset_mean
        return steps, intensity

    def demo_generate(self, length: int = 200, temperature: float = 1.0, seed: int = 0, prime: str = "") -> dict:
        """The demo page's contract: strokes in raw pen units plus per-step gate-change intensity.

        ``prime`` is accepted for the shared contract but unused: this model writes unconditionally.
        """
        if not 1 <= int(length) <= 5000:
            raise ValueError(f"length must be in [1, 5000], got {length}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        steps, intensity = self.generate(int(length), temperature=float(temperature), seed=int(seed), activity=True)
        if intensity is None:  # a plain LSTM has no generated weights
            intensity = torch.zeros(len(steps), 4)
        rows = [[float(dx), float(dy), int(pen)] for dx, dy, pen in steps.tolist()]
        return {"kind": "strokes", "steps": rows, "intensity": intensity.float().tolist()}

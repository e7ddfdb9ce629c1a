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
from hypernetworks.models.handwriting import HandwritingMDN, MDNParams, mdn_nll, sample_mdn
from hypernetworks.nn import gate_change_intensity


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

    demo_kind = "strokes"

    def demo_stream(self, length: int = 200, temperature: float = 1.0, seed: int = 0, prime: str = ""):
        """The demo page's streaming contract: an iterator of ``([dx, dy, pen_up], [i, g, f, o])`` in
        raw pen units, one model step per item, computed as it is consumed.

        The same samples as :meth:`generate` with ``activity=True`` (same seed, same generator
        draws); the intensity is the gate change of the first layer's d_h (zeros for a plain
        LSTM). ``prime`` is accepted for the shared contract but unused: this model writes
        unconditionally. Arguments are checked at the call, before any step.
        """
        if not 1 <= int(length) <= 5000:
            raise ValueError(f"length must be in [1, 5000], got {length}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return self._demo_items(int(length), float(temperature), int(seed))

    def _demo_items(self, length: int, temperature: float, seed: int):
        model = self.model
        was_training = self.training
        self.eval()
        try:
            g = torch.Generator(device=self.offset_mean.device).manual_seed(seed)
            p0 = next(model.parameters())
            x = torch.zeros(1, 1, 3, dtype=p0.dtype, device=p0.device)  # the zero "begin" row, as in sample()
            state, previous = None, None
            for _ in range(length):
                with torch.no_grad():  # not across the yield: grad mode is per thread
                    if model.is_hyper:
                        p, state, act = model.forward_with_activity(x, state)
                        d_h = act[0]["d_h"].reshape(4, -1)  # (1, 1, 4, H) for this single step
                        intensity = gate_change_intensity(d_h[None], previous)[0].float().tolist()
                        previous = d_h
                    else:
                        p, state = model(x, state)
                        intensity = [0.0] * 4
                    p = MDNParams(*(t[:, -1] for t in p))
                    x = sample_mdn(p, self.hparams.sample_bias, temperature, g).view(1, 1, 3)
                    dxdy = x.view(3)[:2] * self.offset_std + self.offset_mean
                yield [float(dxdy[0]), float(dxdy[1]), int(x.view(3)[2])], intensity
        finally:
            self.train(was_training)

    def demo_generate(self, length: int = 200, temperature: float = 1.0, seed: int = 0, prime: str = "") -> dict:
        """The demo page's contract in one piece: :meth:`demo_stream` collected into
        ``{"kind": "strokes", "steps": [[dx, dy, pen_up], ...], "intensity": [[i, g, f, o], ...]}``."""
        items = list(self.demo_stream(length, temperature, seed, prime))
        return {"kind": "strokes", "steps": [s for s, _ in items], "intensity": [i for _, i in items]}

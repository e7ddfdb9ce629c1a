"""Classification with channel-adaptive models: channel sampling in training, per-subset testing.

    model: {class_path: hypernetworks.tasks.channels.ChannelClassifier,
            init_args: {model: hypernet-vit-tiny-p4, channel_sampling: hierarchical,
                        eval_subsets: all}}

The model must take ``model(x, channels)`` (the ``ChannelAdaptiveViT`` family). A batch is
``(x, y)``, whose channels are ``data_channels`` (default: the model's channels, in order), or
``(x, y, names)`` when the dataset says per batch which channels it carries (CHAMMI), or
``(x, y, names, info)`` in CHAMMI's benchmark test set (``CHAMMIDataModule(benchmark=True)``).

* Training: only ``train_channels`` are used (default: all of the batch's); with
  ``channel_sampling="hierarchical"`` every batch keeps a random subset of them (ChannelViT's
  hierarchical channel sampling: subset size uniform, then the subset uniform).
* Validation: on all training channels (``val_acc``).
* Test: ``test_acc`` on all of the data's channels, plus ``test_acc/<a+b+..>`` for every subset
  in ``eval_subsets`` ("all": every non-empty subset; "full": none extra; or a list of lists of
  names). Channels the model knows but never trained on (a leave-one-channel-out run) are given
  an embedding by ``unseen_channel_rule`` before testing (``model.init_unseen_channels``): "mean"
  of the trained channels' embeddings, or DiChaViT's "avg_2", "avg_3", "replicate", "zero" and
  "avg_2_not_in_chunk" / "avg_3_not_in_chunk" (see ``hypernetworks.nn.channels.UNSEEN_RULES``);
  metadata-conditioned models compute theirs from the channel's description instead.
* CHAMMI's benchmark (test batches with ``info``): the head's ``test_acc`` and subset accuracies
  count only the task rows whose class the training data has (novel classes, label -1, and the
  Train reference rows never reach the classification loss); the model's features
  (``forward_features``) of every row are scored at the end of the test by CHAMMI's protocol
  (1-NN macro-F1 per task, ``hypernetworks.tasks.chammi_metrics``) and logged as
  ``chammi/<sub>/<task>/f1_macro`` and ``.../accuracy``, with the aggregates ``chammi/score_f1``
  (the published code's CHAMMI score), ``chammi/<sub>/id_f1`` and ``chammi/<sub>/ood_f1``.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from hypernetworks.data.chammi import in_split
from hypernetworks.nn.channels import UNSEEN_RULES, channel_subsets, sample_channels
from hypernetworks.tasks.chammi_metrics import chammi_aggregate, chammi_benchmark
from hypernetworks.tasks.classification import ImageClassifier

__all__ = ["ChannelClassifier"]

_MAX_ALL_SUBSETS = 10  # "all" on more channels than this would be > 1023 test passes


def _subset_key(names: Sequence[str]) -> str:
    return "+".join(names)


class ChannelClassifier(ImageClassifier):
    """ImageClassifier for models that take ``(x, channels)``.

    Args (beyond ImageClassifier's):
        channel_sampling: "hierarchical" or "none".
        train_channels: names of the channels training may use (default: all the data's).
        data_channels: names of the channels in a 2-tuple batch, in order (default: the model's).
        eval_subsets: "all", "full", or a list of channel-name lists to test on besides the full set.
        unseen_channel_rule: how channels never trained get their embedding before testing
            (``UNSEEN_RULES``; default "mean").
    """

    def __init__(self, model: str = "hypernet-vit-tiny-p4", model_args: dict[str, Any] | None = None,
                 optimizer: str = "adam", lr: float = 1e-3, lr_milestones: list[int] | None = None,
                 lr_values: list[float] | None = None, weight_decay: float = 0.0, num_classes: int = 10,
                 channel_sampling: str = "hierarchical", train_channels: list[str] | None = None,
                 data_channels: list[str] | None = None, eval_subsets: str | list[list[str]] = "all",
                 unseen_channel_rule: str = "mean") -> None:
        super().__init__(model, model_args, optimizer, lr, lr_milestones, lr_values, weight_decay, num_classes)
        if channel_sampling not in ("hierarchical", "none"):
            raise ValueError(f"channel_sampling must be 'hierarchical' or 'none', got {channel_sampling!r}")
        known = list(self.model.channel_names)
        self.data_channels = list(data_channels) if data_channels is not None else known
        for arg, names in (("data_channels", self.data_channels), ("train_channels", train_channels or [])):
            bad = [c for c in names if c not in known]
            if bad:
                raise ValueError(f"{arg} has channels {bad} that the model does not know ({', '.join(known)})")
        if train_channels is not None and not train_channels:
            raise ValueError("train_channels is empty")
        if unseen_channel_rule not in UNSEEN_RULES:
            raise ValueError(f"unseen_channel_rule must be one of {UNSEEN_RULES}, got {unseen_channel_rule!r}")
        self.train_channels = list(train_channels) if train_channels is not None else None
        if eval_subsets == "all":
            if len(self.data_channels) > _MAX_ALL_SUBSETS:
                raise ValueError(f"eval_subsets='all' on {len(self.data_channels)} channels is "
                                 f"{2 ** len(self.data_channels) - 1} subsets; list the subsets to test instead")
            subsets = channel_subsets(self.data_channels)
        elif eval_subsets == "full":
            subsets = []
        elif isinstance(eval_subsets, (list, tuple)) and all(isinstance(s, (list, tuple)) and s for s in eval_subsets):
            subsets = [list(s) for s in eval_subsets]
            for s in subsets:
                bad = [c for c in s if c not in known]
                if bad:
                    raise ValueError(f"eval_subsets entry {s} has unknown channels {bad}")
        else:
            raise ValueError(f"eval_subsets must be 'all', 'full' or a list of channel-name lists, got {eval_subsets!r}")
        self.eval_subsets = subsets
        metric = lambda: torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")  # noqa: E731
        # ModuleDict keys may not contain "."; the logged name keeps the channel names as given.
        self._subset_keys = {_subset_key(s): re.sub(r"[^0-9A-Za-z_+-]", "_", _subset_key(s)) for s in subsets}
        self.subset_acc = torch.nn.ModuleDict({k: metric() for k in self._subset_keys.values()})
        self._unseen_done = False
        self._chammi_features: list[tuple[Tensor, Tensor]] = []

    # ------------------------------------------------------------------------ helpers

    def forward(self, x: Tensor, channels: Sequence[str] | None = None) -> Tensor:
        return self.model(x, channels)

    def _unpack(self, batch) -> tuple[Tensor, Tensor, list[str]]:
        if len(batch) == 4:
            raise ValueError("batches with CHAMMI's benchmark info are for testing only "
                             "(CHAMMIDataModule gives them to the test loader)")
        if len(batch) == 3:
            x, y, names = batch
            names = list(names)
        else:
            x, y = batch
            names = self.data_channels
        if x.shape[1] != len(names):
            raise ValueError(f"batch has {x.shape[1]} channels but its channel names are {names}")
        return x, y, names

    @staticmethod
    def _select(x: Tensor, names: list[str], keep: Sequence[str]) -> Tensor:
        missing = [c for c in keep if c not in names]
        if missing:
            raise ValueError(f"channels {missing} are not in this batch (it has {names})")
        return x[:, [names.index(c) for c in keep]]

    def _train_names(self, names: list[str]) -> list[str]:
        if self.train_channels is None:
            return names
        return [c for c in names if c in self.train_channels]

    # -------------------------------------------------------------------------- steps

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y, names = self._unpack(batch)
        use = self._train_names(names)
        if not use:
            raise ValueError(f"a training batch has none of the train_channels {self.train_channels} (it has {names})")
        if self.hparams.channel_sampling == "hierarchical":
            use = [use[i] for i in sample_channels(len(use))]
        logits = self(self._select(x, names, use), use)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=False, batch_size=len(y))
        if self.hparams.weight_decay:
            loss = loss + 0.5 * self.hparams.weight_decay * self._l2()
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, names = self._unpack(batch)
        use = self._train_names(names)
        logits = self(self._select(x, names, use), use)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, batch_size=len(y))
        self.log("val_acc", self.val_acc, prog_bar=True, batch_size=len(y))

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        n = getattr(dm, "num_classes", None)
        if n is not None and n != self.hparams.num_classes:
            raise ValueError(f"the data has {n} classes but num_classes={self.hparams.num_classes} "
                             "(set model.init_args.num_classes and model_args.num_classes)")

    def unseen_channels(self) -> list[str]:
        """Channels the model knows that training never used."""
        if self.train_channels is None:
            return []
        return [c for c in self.model.channel_names if c not in self.train_channels]

    def on_test_start(self) -> None:
        unseen = self.unseen_channels()
        if unseen and not self._unseen_done and hasattr(self.model, "init_unseen_channels"):
            rule = self.hparams.get("unseen_channel_rule", "mean")
            if rule == "mean":
                self.model.init_unseen_channels(unseen, known=self.train_channels)
            else:
                self.model.init_unseen_channels(unseen, known=self.train_channels, rule=rule)
            self._unseen_done = True
        self._chammi_features = []

    def test_step(self, batch, batch_idx: int) -> None:
        if len(batch) == 4:  # CHAMMI's benchmark test set: Train reference rows + task rows
            x, y, names, info = batch
            names = list(names)
            if not hasattr(self.model, "forward_features") or not hasattr(self.model, "head"):
                raise ValueError("CHAMMI's benchmark scores the model's features: the model needs "
                                 "forward_features(x, channels) and a head")
            feats = self.model.forward_features(x, names)
            self._chammi_features.append((info[:, 0].detach().cpu(), feats.detach().float().cpu()))
            keep = info[:, 1].bool() & (y >= 0)  # task rows of a class the head knows
            if not bool(keep.any()):
                return
            x, y, feats = x[keep], y[keep], feats[keep]
            logits = self.model.head(feats)
        else:
            x, y, names = self._unpack(batch)
            logits = self(x, names)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y), batch_size=len(y))
        self.log("test_acc", self.test_acc, prog_bar=True, batch_size=len(y))
        for subset in self.eval_subsets:
            if not all(c in names for c in subset):
                continue  # a batch of another sub-dataset (CHAMMI) does not carry this subset
            key = self._subset_keys[_subset_key(subset)]
            acc = self.subset_acc[key]
            # the full set in the batch's own order is the forward just done
            acc(logits if list(subset) == names else self(self._select(x, names, subset), subset), y)
            self.log(f"test_acc/{_subset_key(subset)}", acc, batch_size=len(y))

    def on_test_epoch_end(self) -> None:
        if not self._chammi_features:
            return
        dm = getattr(self.trainer, "datamodule", None)
        ds = getattr(dm, "test_set", None)
        if ds is None or not hasattr(ds, "row"):
            loaders = self.trainer.test_dataloaders
            ds = (loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset
        scores = chammi_test_scores(self._chammi_features, ds)
        self._chammi_features = []
        for sub, tasks in scores.items():
            for task, s in tasks.items():
                self.log(f"chammi/{sub}/{task}/f1_macro", s["f1_macro"])
                self.log(f"chammi/{sub}/{task}/accuracy", s["accuracy"])
        for key, value in chammi_aggregate(scores).items():
            self.log(f"chammi/{key}", value)
        self.chammi_scores = scores


def chammi_test_scores(collected: Sequence[tuple[Tensor, Tensor]], dataset) -> dict[str, dict[str, dict[str, float]]]:
    """CHAMMI's scores from features collected over a benchmark test set: ``collected`` holds
    ``(sample indices, features)`` batches of ``dataset`` (a ``CHAMMI(with_info=True)`` whose rows
    are the Train reference rows and those of its ``tasks``). Returns ``{sub: {task: scores}}``."""
    idx = torch.cat([i for i, _ in collected])
    feats = torch.cat([f for _, f in collected])
    if len(set(idx.tolist())) != len(idx):
        raise ValueError(f"CHAMMI's benchmark got {len(idx) - len(set(idx.tolist()))} test samples twice")
    if len(idx) != len(dataset):  # limit_test_batches, or a multi-process test that shards the samples
        warnings.warn(f"CHAMMI's benchmark needs the features of every test sample: got {len(idx)} of {len(dataset)} "
                      "(test all batches, in one process); its scores are not logged", stacklevel=2)
        return {}
    order = idx.argsort()
    idx, feats = idx[order], feats[order]
    by_sub: dict[str, list[int]] = {}
    for pos, i in enumerate(idx.tolist()):
        by_sub.setdefault(dataset.row(i)[0], []).append(pos)
    out = {}
    for sub, pos in by_sub.items():
        rows = [dataset.row(i)[1] for i in idx[pos].tolist()]
        tasks = [t for t in dataset.tasks if any(r["train_test_split"] != "Train" and in_split(r, t) for r in rows)]
        if tasks:
            out[sub] = chammi_benchmark(feats[pos], rows, sub, tasks=tasks)
    return out


@torch.no_grad()
def evaluate_chammi(model: torch.nn.Module, root: str, sub_datasets: Sequence[str] = ("Allen", "HPA", "CP"),
                    img_size: int = 224, batch_size: int = 128) -> dict[str, dict[str, dict[str, float]]]:
    """CHAMMI's benchmark for a trained channel-adaptive model: its features (``forward_features``)
    of every image of each sub-dataset, scored by ``chammi_benchmark`` (1-NN, macro-F1 per task).
    Returns ``{sub_dataset: {task: {"accuracy", "f1_macro", "n"}}}``."""
    from torch.utils.data import DataLoader

    from hypernetworks.data.channel_utils import ResizeTo
    from hypernetworks.data.chammi import CHAMMI, collate_channels

    was_training = model.training
    model.eval()
    out = {}
    try:
        for sub in sub_datasets:
            ds = CHAMMI(root, [sub], "all", transform=ResizeTo(img_size))
            feats = [model.forward_features(x, names)
                     for x, _, names in DataLoader(ds, batch_size=batch_size, collate_fn=collate_channels)]
            out[sub] = chammi_benchmark(torch.cat(feats), ds.rows[sub], sub)
    finally:
        model.train(was_training)
    return out

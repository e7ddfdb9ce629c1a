"""What the multi-channel imaging datasets share: per-channel normalisation looked up by channel
name, channel statistics, the data-module base, a resize for crops of differing sizes and the
checked download helper. The datasets themselves are ``hypernetworks.data.so2sat``,
``hypernetworks.data.chammi`` and ``hypernetworks.data.jumpcp``.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import Dataset

from hypernetworks.data.images import DatasetFileError, SplitLoaders, default_data_root

__all__ = ["ChannelNormalize", "channel_stats", "ResizeTo"]

class ChannelNormalize:
    """Per-channel (x - mean) / std for the channels of a sample, looked up by name, so one
    transform serves any channel subset."""

    def __init__(self, stats: dict[str, tuple[float, float]], channels: Sequence[str]) -> None:
        missing = [c for c in channels if c not in stats]
        if missing:
            raise ValueError(f"no normalisation statistics for channels {missing}")
        self.mean = torch.tensor([stats[c][0] for c in channels]).view(-1, 1, 1)
        self.std = torch.tensor([max(stats[c][1], 1e-8) for c in channels]).view(-1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def channel_stats(ds: Dataset, channels: Sequence[str], max_samples: int = 2048) -> dict[str, tuple[float, float]]:
    """Mean and std of each channel over the first ``max_samples`` samples (evenly spaced)."""
    n = len(ds)
    idx = np.linspace(0, n - 1, min(n, max_samples)).astype(int) if n else []
    s = s2 = None
    count = 0
    for i in idx:
        x = ds[int(i)][0].double()
        flat = x.flatten(1)
        s = flat.sum(1) if s is None else s + flat.sum(1)
        s2 = (flat ** 2).sum(1) if s2 is None else s2 + (flat ** 2).sum(1)
        count += flat.shape[1]
    if not count:
        raise ValueError("cannot compute channel statistics of an empty dataset")
    mean = s / count
    std = (s2 / count - mean ** 2).clamp_min(0).sqrt()
    return {c: (float(m), float(d)) for c, m, d in zip(channels, mean, std)}


class _MultiChannelDataModule(SplitLoaders, LightningDataModule):
    def __init__(self, root: str | None, folder: str, batch_size: int, eval_batch_size: int, num_workers: int) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size}, {eval_batch_size}")
        self.root = Path(root) if root else default_data_root() / folder
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.train_set = self.val_set = self.test_set = None

    @property
    def num_classes(self) -> int | None:
        """The training data's classes (after setup); the task checks its num_classes against it."""
        return None if self.train_set is None else self.train_set.num_classes


class ResizeTo:
    """Bilinear resize of a (C, H, W) tensor to size x size (CHAMMI's crops differ in size)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: Tensor) -> Tensor:
        return torch.nn.functional.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                                               align_corners=False)[0]


_ResizeTo = ResizeTo  # the former private name


def _fetch(url: str, dest: Path, md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically; check the MD5 when the owner publishes one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        if md5 is not None and h.hexdigest() != md5:
            raise DatasetFileError(f"{url}: MD5 {h.hexdigest()} differs from the published {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


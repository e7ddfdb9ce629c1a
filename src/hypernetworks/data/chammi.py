"""CHAMMI (Chen et al., 2023): single-cell images of WTC-11 (``Allen``, 3 channels), HPA (4) and
Cell Painting (``CP``, 5) in their published format.

Per sub-dataset a metadata CSV ``<sub>/enriched_meta.csv`` with ``file_path`` (relative to the
root), ``channel_width``, ``train_test_split`` (Train, Task_one, ...), ``Label`` and the task
columns; each image is one PNG strip of its channels side by side, folded back here to
(C, H, channel_width). Batches must hold one sub-dataset (``SubDatasetBatchSampler``);
``collate_channels`` returns ``(x, y, channel_names)`` (plus each sample's ``[index, in_task]``
in the benchmark's test set, ``CHAMMI(with_info=True)``). The benchmark's scoring (1-nearest-neighbour macro-F1) is
``hypernetworks.tasks.chammi_metrics``.
"""
from __future__ import annotations

import csv
import json
import os
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hypernetworks.data.channel_utils import ResizeTo, _fetch, _MultiChannelDataModule
from hypernetworks.data.images import DatasetFileError, default_data_root

__all__ = ["CHAMMI", "CHAMMIDataModule", "SubDatasetBatchSampler", "collate_channels", "CHAMMI_CHANNELS",
           "CHAMMI_SPLITS", "CHAMMI_TASKS", "fold_strip", "in_split", "download_chammi"]

# Sub-dataset -> channel names in strip order (CHAMMI, Chen et al. 2023). Prefixed with the
# sub-dataset, as the CHAMMI baselines treat the 3 + 4 + 5 channels as 12 distinct ones.
CHAMMI_CHANNELS: dict[str, list[str]] = {
    "Allen": ["Allen:nucleus", "Allen:membrane", "Allen:protein"],
    "HPA": ["HPA:microtubules", "HPA:protein", "HPA:nucleus", "HPA:er"],
    "CP": ["CP:nucleus", "CP:er", "CP:rna", "CP:golgi_actin", "CP:mitochondria"],
}
CHAMMI_SPLITS = ("Train", "Task_one", "Task_two", "Task_three", "Task_four")
# The task splits of each sub-dataset, in the benchmark's order (WTC-11 has two, HPA three, CP four).
CHAMMI_TASKS: dict[str, tuple[str, ...]] = {
    "Allen": ("Task_one", "Task_two"),
    "HPA": ("Task_one", "Task_two", "Task_three"),
    "CP": ("Task_one", "Task_two", "Task_three", "Task_four"),
}
_CHAMMI_COLUMNS = ("file_path", "channel_width", "train_test_split", "Label")


def fold_strip(strip: np.ndarray, channel_width: int, num_channels: int | None = None, *, name: str = "image") -> np.ndarray:
    """A (H, C * w) strip of channels side by side -> (C, H, w)."""
    if strip.ndim != 2:
        raise DatasetFileError(f"{name}: expected a single-plane (grey) strip, got shape {strip.shape}")
    h, total = strip.shape
    if channel_width < 1 or total % channel_width:
        raise DatasetFileError(f"{name}: width {total} is not a multiple of channel_width {channel_width}")
    c = total // channel_width
    if num_channels is not None and c != num_channels:
        raise DatasetFileError(f"{name}: {c} channels of width {channel_width}, expected {num_channels}")
    return strip.reshape(h, c, channel_width).transpose(1, 0, 2)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"CHAMMI image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except Exception as e:
        raise DatasetFileError(f"{path}: not a decodable PNG ({e}); the file is truncated or corrupt") from e
    return arr


def in_split(row: dict[str, str], split: str) -> bool:
    """Whether a CHAMMI metadata row belongs to ``split``: the task's own True/False column where
    the CSV has one (a row may serve several tasks), else its ``train_test_split`` value."""
    if split != "Train" and split in row and row[split] not in (None, ""):
        return row[split].strip().lower() in ("true", "1")
    return row["train_test_split"] == split


class CHAMMI(Dataset):
    """CHAMMI single-cell images of one or more sub-datasets and one or more splits.

    Args:
        root: the CHAMMI folder (``Allen/``, ``HPA/``, ``CP/`` each with ``enriched_meta.csv``).
        sub_datasets: which of "Allen", "HPA", "CP".
        splits: ``train_test_split`` values to keep ("Train", "Task_one", ...).
        classes: label vocabulary; default: the sorted labels of the Train rows of these
            sub-datasets, as "<sub>:<label>" (rows whose label is not in it get label -1: the
            novel classes of CHAMMI's out-of-distribution tasks).
        transform: applied to each (C, H, W) float32 tensor in [0, 1].
        with_info: also return each sample's ``info``, a long tensor ``[index, in_task]``: its index
            in this dataset and 1 when the row belongs to one of the task splits kept (0 for a Train
            row, which the benchmark uses only as the 1-NN reference set).

    ``self[i]`` -> ``(image, label, channel_names)`` (plus ``info`` with ``with_info``); ``subsets()``
    maps each sub-dataset to its indices; ``self.samples[i]`` is ``(sub_dataset, file_path,
    channel_width, label, row)`` with ``row`` the index of its metadata row in ``self.rows[sub_dataset]``.
    """

    def __init__(self, root: str | os.PathLike, sub_datasets: Sequence[str] = ("Allen", "HPA", "CP"),
                 splits: Sequence[str] | str = ("Train",), classes: Sequence[str] | None = None,
                 transform: Callable | None = None, with_info: bool = False) -> None:
        self.root = Path(root)
        bad = [s for s in sub_datasets if s not in CHAMMI_CHANNELS]
        if bad or not sub_datasets:
            raise ValueError(f"sub_datasets must be among {list(CHAMMI_CHANNELS)}, got {list(sub_datasets)}")
        if splits != "all":
            bad = [s for s in splits if s not in CHAMMI_SPLITS]
            if bad or not splits or isinstance(splits, str):
                raise ValueError(f"splits must be 'all' or a list among {CHAMMI_SPLITS}, got {splits!r}")
        self.transform, self.with_info = transform, with_info
        self.tasks = list(CHAMMI_SPLITS[1:]) if splits == "all" else [s for s in splits if s != "Train"]
        rows, train_labels = [], set()
        self.rows: dict[str, list[dict[str, str]]] = {}  # the metadata of each sub-dataset, file order
        for sub in sub_datasets:
            self.rows[sub] = self._read_csv(self.root / sub / "enriched_meta.csv")
            for k, r in enumerate(self.rows[sub]):
                label = f"{sub}:{r['Label']}"
                if r["train_test_split"] == "Train":
                    train_labels.add(label)
                if splits == "all" or any(in_split(r, s) for s in splits):
                    rows.append((sub, r["file_path"], int(r["channel_width"]), label, k))
        self.classes = list(classes) if classes is not None else sorted(train_labels)
        index = {c: k for k, c in enumerate(self.classes)}
        self.samples = [(sub, path, cw, index.get(label, -1), k) for sub, path, cw, label, k in rows]
        self.in_task = [any(in_split(self.rows[sub][k], t) for t in self.tasks) for sub, *_, k in self.samples]
        self.channels = [c for s in sub_datasets for c in CHAMMI_CHANNELS[s]]

    @staticmethod
    def _read_csv(path: Path) -> list[dict[str, str]]:
        if not path.is_file():
            raise FileNotFoundError(f"CHAMMI metadata not found: {path}")
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (UnicodeDecodeError, csv.Error) as e:
            raise DatasetFileError(f"{path}: not a readable CSV ({e})") from e
        if not rows:
            raise DatasetFileError(f"{path}: no rows")
        missing = [c for c in _CHAMMI_COLUMNS if c not in rows[0]]
        if missing:
            raise DatasetFileError(f"{path}: missing columns {missing} (has {list(rows[0])})")
        for k, r in enumerate(rows):
            if any(r.get(c) in (None, "") for c in _CHAMMI_COLUMNS) or not str(r["channel_width"]).isdigit():
                raise DatasetFileError(f"{path}: row {k + 2} is incomplete or has a bad channel_width: {r}")
        return rows

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def subsets(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, s in enumerate(self.samples):
            out.setdefault(s[0], []).append(i)
        return out

    def __getitem__(self, i: int):
        sub, rel, cw, label, _ = self.samples[i]
        path = self.root / rel
        arr = fold_strip(_read_png(path), cw, len(CHAMMI_CHANNELS[sub]), name=str(path))
        scale = 65535.0 if arr.dtype == np.uint16 else 255.0
        x = torch.from_numpy(arr.astype(np.float32) / scale)
        if self.transform is not None:
            x = self.transform(x)
        if self.with_info:
            return x, label, tuple(CHAMMI_CHANNELS[sub]), torch.tensor([i, int(self.in_task[i])])
        return x, label, tuple(CHAMMI_CHANNELS[sub])

    def row(self, i: int) -> tuple[str, dict[str, str]]:
        """The sub-dataset and metadata row of sample ``i``."""
        sub, *_, k = self.samples[i]
        return sub, self.rows[sub][k]


class SubDatasetBatchSampler(Sampler[list[int]]):
    """Batches that each hold samples of one sub-dataset (one channel set), shuffled per epoch."""

    def __init__(self, groups: dict[str, list[int]], batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0) -> None:
        self.groups, self.batch_size, self.shuffle, self.drop_last, self.seed = groups, batch_size, shuffle, drop_last, seed
        self.epoch = 0

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        out = []
        for idx in self.groups.values():
            order = [idx[j] for j in torch.randperm(len(idx), generator=g)] if self.shuffle else list(idx)
            for k in range(0, len(order), self.batch_size):
                b = order[k:k + self.batch_size]
                if len(b) == self.batch_size or not self.drop_last:
                    out.append(b)
        if self.shuffle:
            out = [out[j] for j in torch.randperm(len(out), generator=g)]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self._batches())


def collate_channels(batch):
    """(image, label, channel_names[, info]) samples of one channel set -> (x, y, channel_names[, info])."""
    names = batch[0][2]
    if any(b[2] != names for b in batch):
        raise ValueError("a batch mixes channel sets; use SubDatasetBatchSampler")
    out = (torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), list(names))
    if len(batch[0]) == 4:
        out = (*out, torch.stack([b[3] for b in batch]))
    return out


class CHAMMIDataModule(_MultiChannelDataModule):
    """CHAMMI: training on the Train rows of the chosen sub-datasets, testing on its task splits;
    batches hold one sub-dataset each and come as ``(x, y, channel_names)``.

    The test set follows the benchmark's protocol (``benchmark=True``): it holds the rows of the
    test task splits *and* every Train row (the 1-nearest-neighbour reference set), and its
    batches are ``(x, y, channel_names, info)`` (see ``CHAMMI(with_info=True)``), from which
    ``ChannelClassifier`` computes CHAMMI's macro-F1 per task on the model's features, and its
    head's accuracy on the task rows whose class the training data has (a novel class, label -1,
    never reaches the classification loss or accuracy).

    Args:
        root: the CHAMMI folder; default <data root>/chammi.
        sub_datasets: any of "Allen", "HPA", "CP".
        test_split: "all" (every task split: the whole benchmark), one task split ("Task_one",
            ...) or a list of them.
        benchmark: include the Train rows as the 1-NN reference set in the test set (default);
            False tests the head on the task rows only, as ``(x, y, channel_names)``.
        val_fraction: share of Train rows held out for validation (seeded).
        img_size: images are resized to img_size x img_size.
    """

    def __init__(self, root: str | None = None, sub_datasets: Sequence[str] = ("Allen", "HPA", "CP"),
                 test_split: str | Sequence[str] = "all", benchmark: bool = True, val_fraction: float = 0.05,
                 img_size: int = 224, batch_size: int = 64, eval_batch_size: int = 128, num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__(root, "chammi", batch_size, eval_batch_size, num_workers)
        tasks = list(CHAMMI_SPLITS[1:]) if test_split == "all" else (
            [test_split] if isinstance(test_split, str) else list(test_split))
        if not tasks or any(t not in CHAMMI_SPLITS[1:] for t in tasks):
            raise ValueError(f"test_split must be 'all' or among {CHAMMI_SPLITS[1:]}, got {test_split!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.sub_datasets, self.test_split, self.val_fraction = list(sub_datasets), test_split, val_fraction
        self.test_tasks, self.benchmark = tasks, bool(benchmark)
        self.img_size, self.seed = img_size, seed
        self._val_groups: dict[str, list[int]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tf = ResizeTo(self.img_size)
        train = CHAMMI(self.root, self.sub_datasets, ["Train"], transform=tf)
        g = torch.Generator().manual_seed(self.seed)
        self._train_groups, self._val_groups = {}, {}
        for sub, idx in train.subsets().items():
            perm = [idx[j] for j in torch.randperm(len(idx), generator=g)]
            k = int(len(perm) * self.val_fraction)
            self._val_groups[sub], self._train_groups[sub] = perm[:k], perm[k:]
        self.train_set = self.val_set = train
        splits = (["Train"] if self.benchmark else []) + self.test_tasks
        self.test_set = CHAMMI(self.root, self.sub_datasets, splits, classes=train.classes, transform=tf,
                               with_info=self.benchmark)

    def _grouped(self, ds: Dataset, groups: dict[str, list[int]], train: bool) -> DataLoader:
        sampler = SubDatasetBatchSampler(groups, self.batch_size if train else self.eval_batch_size, shuffle=train,
                                         drop_last=train, seed=self.seed)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate_channels, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._grouped(self.train_set, self._train_groups, True)

    def val_dataloader(self) -> DataLoader:
        return self._grouped(self.val_set, self._val_groups, False)

    def test_dataloader(self) -> DataLoader:
        return self._grouped(self.test_set, self.test_set.subsets(), False)


CHAMMI_ZENODO_RECORD = "https://zenodo.org/api/records/7988357"


def download_chammi(root: str | os.PathLike | None = None) -> Path:
    """Fetch CHAMMI from its Zenodo record, checking each file against the MD5 that Zenodo
    publishes in the record, and unpack zip archives into ``root``."""
    root = Path(root) if root else default_data_root() / "chammi"
    with urllib.request.urlopen(CHAMMI_ZENODO_RECORD, timeout=60) as resp:
        record = json.load(resp)
    for entry in record.get("files", []):
        name, checksum = entry["key"], entry.get("checksum", "")
        url = entry.get("links", {}).get("self") or f"https://zenodo.org/records/7988357/files/{name}"
        md5 = checksum.split(":", 1)[1] if checksum.startswith("md5:") else None
        dest = _fetch(url, root / name, md5)
        if dest.suffix == ".zip":
            import zipfile

            with zipfile.ZipFile(dest) as z:
                z.extractall(root)
    return root


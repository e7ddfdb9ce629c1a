"""Multi-channel imaging datasets in their published formats: So2Sat LCZ42, CHAMMI, JUMP-CP.

Every dataset returns ``(image, label)`` with image a float32 (C, H, W) tensor and knows its
channel names (``.channels``), which the channel-adaptive models take with each batch. Missing
files raise FileNotFoundError, files that exist but are truncated or corrupt raise
``DatasetFileError`` naming the file. Default roots are ``<data root>/so2sat_lcz42``,
``<data root>/chammi`` and ``<data root>/jumpcp`` (see ``hypernetworks.data.images.default_data_root``).

* **So2Sat LCZ42** (Zhu et al., 2020): ``training.h5`` / ``validation.h5`` / ``testing.h5``, each
  with ``sen1`` (N, 32, 32, 8) Sentinel-1 SAR, ``sen2`` (N, 32, 32, 10) Sentinel-2 bands and a
  one-hot ``label`` (N, 17). Read lazily with h5py (one sample per access; the files are 50 GB).
* **CHAMMI** (Chen et al., 2023): per sub-dataset (``Allen`` = WTC-11, ``HPA``, ``CP``) a
  metadata CSV ``<sub>/enriched_meta.csv`` with ``file_path`` (relative to the root),
  ``channel_width``, ``train_test_split`` (Train, Task_one, ...) and ``Label``; each image is one
  PNG strip of its channels side by side, folded back here to (C, H, channel_width): 3, 4 and 5
  channels. Batches must hold one sub-dataset (``SubDatasetBatchSampler``); ``collate_channels``
  returns ``(x, y, channel_names)``.
* **JUMP-CP** (the ContextViT / ChannelViT release of plate BR00116991 of cpg0000): a parquet
  index (``BR00116991.pq``: ``path`` of an 8-channel ``.npy`` image, ``ID``, ``well_loc``) and the
  JUMP-Target-1 plate map + compound metadata (``platemap_and_metadata/``), from which a well's
  label is its compound's target (controls = class 0; 161 classes), split 60/20/20 at random with
  seed 0 as in ChannelViT.

Download helpers (``download_so2sat``, ``download_chammi``, ``download_jumpcp``) fetch from the
owners' public URLs for users; they are never run by the tests.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from hypernetworks.data.images import DatasetFileError, SplitLoaders, default_data_root

__all__ = [
    "So2SatLCZ42", "CHAMMI", "JUMPCP", "ChannelNormalize", "SubDatasetBatchSampler", "collate_channels",
    "So2SatDataModule", "CHAMMIDataModule", "JUMPCPDataModule",
    "SO2SAT_CHANNELS", "SO2SAT_METADATA", "SO2SAT_CLASSES", "CHAMMI_CHANNELS", "JUMPCP_CHANNELS",
    "download_so2sat", "download_chammi", "download_jumpcp", "fold_strip", "chammi_benchmark", "in_split",
]

# ------------------------------------------------------------------------------------ So2Sat

SO2SAT_SEN1 = ["S1_VH_real", "S1_VH_imag", "S1_VV_real", "S1_VV_imag", "S1_VH_lee", "S1_VV_lee",
               "S1_cov_real", "S1_cov_imag"]
SO2SAT_SEN2 = ["S2_B2", "S2_B3", "S2_B4", "S2_B5", "S2_B6", "S2_B7", "S2_B8", "S2_B8A", "S2_B11", "S2_B12"]
SO2SAT_CHANNELS = SO2SAT_SEN1 + SO2SAT_SEN2
SO2SAT_CLASSES = ["compact high-rise", "compact mid-rise", "compact low-rise", "open high-rise", "open mid-rise",
                  "open low-rise", "lightweight low-rise", "large low-rise", "sparsely built", "heavy industry",
                  "dense trees", "scattered trees", "bush, scrub", "low plants", "bare rock or paved",
                  "bare soil or sand", "water"]


def _s2(center_nm: float, width_nm: float) -> list[float]:
    return [math.log10(center_nm), math.log10(width_nm), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def _s1(pol: str, part: str, lee: bool) -> list[float]:
    # C band, 5.405 GHz: wavelength 5.55 cm; ~100 MHz range bandwidth -> ~1 mm in wavelength.
    return [math.log10(5.547e7), math.log10(1.03e6), 1.0, float(pol == "VV"), float(pol == "VH"),
            float(part == "real"), float(part == "imag"), float(lee)]


# The generator input for metadata conditioning: log10 centre wavelength (nm), log10 band width
# (nm), SAR flag, VV, VH, real part, imaginary part, Lee-filtered. Sentinel-2 centres and widths
# are the Sentinel-2A spectral response values (ESA); S1 numbers are the C-band radar's.
SO2SAT_METADATA: dict[str, list[float]] = {
    "S1_VH_real": _s1("VH", "real", False), "S1_VH_imag": _s1("VH", "imag", False),
    "S1_VV_real": _s1("VV", "real", False), "S1_VV_imag": _s1("VV", "imag", False),
    "S1_VH_lee": _s1("VH", "intensity", True), "S1_VV_lee": _s1("VV", "intensity", True),
    "S1_cov_real": _s1("VH+VV", "real", True), "S1_cov_imag": _s1("VH+VV", "imag", True),
    "S2_B2": _s2(492.4, 66), "S2_B3": _s2(559.8, 36), "S2_B4": _s2(664.6, 31), "S2_B5": _s2(704.1, 15),
    "S2_B6": _s2(740.5, 15), "S2_B7": _s2(782.8, 20), "S2_B8": _s2(832.8, 106), "S2_B8A": _s2(864.7, 21),
    "S2_B11": _s2(1613.7, 91), "S2_B12": _s2(2202.4, 175),
}

_H5_SPLITS = {"train": "training.h5", "val": "validation.h5", "test": "testing.h5"}


def _h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a dependency
        raise ImportError("So2Sat LCZ42 needs h5py (pip install h5py)") from e
    return h5py


class So2SatLCZ42(Dataset):
    """So2Sat LCZ42 from ``root/{training,validation,testing}.h5``, read lazily.

    Args:
        root: the folder with the h5 files.
        split: "train", "val" or "test" (the official files; the "city split" of version 1).
        channels: names (from ``SO2SAT_CHANNELS``) to return, in that order; default all 18.
        transform: applied to the (C, 32, 32) float32 tensor.
    """

    num_classes = 17

    def __init__(self, root: str | os.PathLike, split: str = "train", channels: Sequence[str] | None = None,
                 transform: Callable | None = None) -> None:
        if split not in _H5_SPLITS:
            raise ValueError(f"split must be one of {list(_H5_SPLITS)}, got {split!r}")
        self.path = Path(root) / _H5_SPLITS[split]
        self.channels = list(channels) if channels is not None else list(SO2SAT_CHANNELS)
        bad = [c for c in self.channels if c not in SO2SAT_CHANNELS]
        if bad or not self.channels:
            raise ValueError(f"channels {bad or '[]'} are not So2Sat channels ({', '.join(SO2SAT_CHANNELS)})")
        self.transform = transform
        if not self.path.is_file():
            raise FileNotFoundError(f"So2Sat LCZ42 file not found: {self.path} (download_so2sat fetches it)")
        with self._open() as f:
            shapes = {}
            for key in ("sen1", "sen2", "label"):
                if key not in f:
                    raise DatasetFileError(f"{self.path}: no '{key}' dataset (has {sorted(f.keys())})")
                shapes[key] = f[key].shape
        n = shapes["label"][0]
        if (shapes["sen1"] != (n, 32, 32, 8) or shapes["sen2"] != (n, 32, 32, 10) or shapes["label"] != (n, 17)):
            raise DatasetFileError(f"{self.path}: shapes {shapes} are not sen1 (N,32,32,8), sen2 (N,32,32,10), "
                                   "label (N,17)")
        self._n = n
        # read in file order, then put in the requested order
        self._s1 = [k for k, c in enumerate(SO2SAT_SEN1) if c in self.channels]
        self._s2 = [k for k, c in enumerate(SO2SAT_SEN2) if c in self.channels]
        order = [c for c in SO2SAT_CHANNELS if c in self.channels]  # how they come out of the file
        self._order = [order.index(c) for c in self.channels]
        self._file = None  # opened per process on first access (h5py handles do not survive fork)

    def _open(self):
        try:
            return _h5py().File(self.path, "r")
        except OSError as e:
            raise DatasetFileError(f"{self.path}: not a readable HDF5 file ({e}); it is truncated or corrupt") from e

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int):
        if not 0 <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} samples")
        if self._file is None or self._file_pid != os.getpid():
            self._file, self._file_pid = self._open(), os.getpid()
        f = self._file
        try:
            parts = []
            if self._s1:
                parts.append(np.asarray(f["sen1"][i], dtype=np.float32)[..., self._s1])
            if self._s2:
                parts.append(np.asarray(f["sen2"][i], dtype=np.float32)[..., self._s2])
            onehot = np.asarray(f["label"][i])
        except (OSError, KeyError) as e:
            raise DatasetFileError(f"{self.path}: cannot read sample {i} ({e}); the file is truncated or corrupt") from e
        if onehot.sum() != 1 or not np.isin(onehot, (0, 1)).all():
            raise DatasetFileError(f"{self.path}: label of sample {i} is not one-hot: {onehot.tolist()}")
        x = torch.from_numpy(np.concatenate(parts, axis=-1)[..., self._order].transpose(2, 0, 1).copy())
        if self.transform is not None:
            x = self.transform(x)
        return x, int(onehot.argmax())

    def __getstate__(self):  # DataLoader workers: reopen in the child
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def labels(self) -> np.ndarray:
        """All labels (reads only the label dataset)."""
        with self._open() as f:
            return np.asarray(f["label"][:]).argmax(1)


# ------------------------------------------------------------------------------------ CHAMMI

# Sub-dataset -> channel names in strip order (CHAMMI, Chen et al. 2023). Prefixed with the
# sub-dataset, as the CHAMMI baselines treat the 3 + 4 + 5 channels as 12 distinct ones.
CHAMMI_CHANNELS: dict[str, list[str]] = {
    "Allen": ["Allen:nucleus", "Allen:membrane", "Allen:protein"],
    "HPA": ["HPA:microtubules", "HPA:protein", "HPA:nucleus", "HPA:er"],
    "CP": ["CP:nucleus", "CP:er", "CP:rna", "CP:golgi_actin", "CP:mitochondria"],
}
CHAMMI_SPLITS = ("Train", "Task_one", "Task_two", "Task_three", "Task_four")
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


# CHAMMI's out-of-distribution tasks scored by leaving out one group at a time (MorphEm benchmark).
CHAMMI_LEAVE_OUT = {"Allen": None, "HPA": ("Task_three", "cell_type"), "CP": ("Task_four", "Plate")}


def _nearest_neighbour(train_x: Tensor, train_y: Tensor, test_x: Tensor, chunk: int = 4096) -> Tensor:
    """1-nearest-neighbour (Euclidean) labels of ``test_x``."""
    out = [train_y[torch.cdist(test_x[k:k + chunk], train_x).argmin(1)] for k in range(0, len(test_x), chunk)]
    return torch.cat(out) if out else train_y.new_zeros(0)


def _macro_f1(pred: Tensor, truth: Tensor) -> float:
    """F1 averaged over the labels present in ``truth`` (as CHAMMI scores with sklearn's
    ``f1_score(labels=unique(truth), average="macro")``)."""
    f1 = []
    for c in truth.unique():
        tp = int(((pred == c) & (truth == c)).sum())
        fp = int(((pred == c) & (truth != c)).sum())
        fn = int(((pred != c) & (truth == c)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(sum(f1) / len(f1)) if f1 else float("nan")


def chammi_benchmark(features: Tensor, rows: list[dict[str, str]], sub_dataset: str) -> dict[str, dict[str, float]]:
    """CHAMMI's evaluation of one sub-dataset: ``features`` (one row per metadata row, file order)
    are classified by a 1-nearest-neighbour classifier fitted on the Train rows, for every task
    split; a leave-out task (HPA Task_three by cell type, CP Task_four by plate) instead classifies
    each group with a classifier fitted on Train plus the task's other groups. Returns
    ``{task: {"accuracy", "f1_macro", "n"}}``; CHAMMI's headline is the macro-F1."""
    if len(features) != len(rows):
        raise ValueError(f"{len(features)} feature rows for {len(rows)} metadata rows")
    if sub_dataset not in CHAMMI_LEAVE_OUT:
        raise ValueError(f"sub_dataset must be one of {list(CHAMMI_LEAVE_OUT)}, got {sub_dataset!r}")
    x = features.float()
    codes: dict[str, int] = {}
    y = torch.tensor([codes.setdefault(r["Label"], len(codes)) for r in rows])
    tasks = []
    for r in rows:
        if r["train_test_split"] != "Train" and r["train_test_split"] not in tasks:
            tasks.append(r["train_test_split"])
    train = torch.tensor([r["train_test_split"] == "Train" for r in rows])
    leave = CHAMMI_LEAVE_OUT[sub_dataset]
    out = {}
    for task in tasks:
        member = torch.tensor([in_split(r, task) for r in rows])
        if leave is not None and task == leave[0]:
            groups = [r.get(leave[1]) for r in rows]
            if any(g in (None, "") for g, m in zip(groups, member.tolist()) if m):
                raise ValueError(f"{sub_dataset} {task}: rows without the leave-out column {leave[1]!r}")
            preds, truths = [], []
            for g in dict.fromkeys(g for g, m in zip(groups, member.tolist()) if m):
                held = member & torch.tensor([gg == g for gg in groups])
                fit = train | (member & ~held)
                preds.append(_nearest_neighbour(x[fit], y[fit], x[held]))
                truths.append(y[held])
            pred, truth = torch.cat(preds), torch.cat(truths)
        else:
            pred, truth = _nearest_neighbour(x[train], y[train], x[member]), y[member]
        out[task] = {"accuracy": float((pred == truth).float().mean()) if len(truth) else float("nan"),
                     "f1_macro": _macro_f1(pred, truth), "n": int(len(truth))}
    return out


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

    ``self[i]`` -> ``(image, label, channel_names)``; ``subsets()`` maps each sub-dataset to its indices.
    """

    def __init__(self, root: str | os.PathLike, sub_datasets: Sequence[str] = ("Allen", "HPA", "CP"),
                 splits: Sequence[str] | str = ("Train",), classes: Sequence[str] | None = None,
                 transform: Callable | None = None) -> None:
        self.root = Path(root)
        bad = [s for s in sub_datasets if s not in CHAMMI_CHANNELS]
        if bad or not sub_datasets:
            raise ValueError(f"sub_datasets must be among {list(CHAMMI_CHANNELS)}, got {list(sub_datasets)}")
        if splits != "all":
            bad = [s for s in splits if s not in CHAMMI_SPLITS]
            if bad or not splits or isinstance(splits, str):
                raise ValueError(f"splits must be 'all' or a list among {CHAMMI_SPLITS}, got {splits!r}")
        self.transform = transform
        rows, train_labels = [], set()
        self.rows: dict[str, list[dict[str, str]]] = {}  # the metadata of each sub-dataset, file order
        for sub in sub_datasets:
            self.rows[sub] = self._read_csv(self.root / sub / "enriched_meta.csv")
            for r in self.rows[sub]:
                label = f"{sub}:{r['Label']}"
                if r["train_test_split"] == "Train":
                    train_labels.add(label)
                if splits == "all" or any(in_split(r, s) for s in splits):
                    rows.append((sub, r["file_path"], int(r["channel_width"]), label))
        self.classes = list(classes) if classes is not None else sorted(train_labels)
        index = {c: k for k, c in enumerate(self.classes)}
        self.samples = [(sub, path, cw, index.get(label, -1)) for sub, path, cw, label in rows]
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
        sub, rel, cw, label = self.samples[i]
        path = self.root / rel
        arr = fold_strip(_read_png(path), cw, len(CHAMMI_CHANNELS[sub]), name=str(path))
        scale = 65535.0 if arr.dtype == np.uint16 else 255.0
        x = torch.from_numpy(arr.astype(np.float32) / scale)
        if self.transform is not None:
            x = self.transform(x)
        return x, label, tuple(CHAMMI_CHANNELS[sub])


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
    """(image, label, channel_names) samples of one channel set -> (x, y, channel_names)."""
    names = batch[0][2]
    if any(b[2] != names for b in batch):
        raise ValueError("a batch mixes channel sets; use SubDatasetBatchSampler")
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), list(names)


# ----------------------------------------------------------------------------------- JUMP-CP

# Five fluorescence stains then three brightfield planes, the order of the released .npy files
# (ChannelViT uses channels 5-7 as its "brightfield" set). Which stain is which of the five is
# not recorded in the release; pass ``channel_names`` to name them.
JUMPCP_CHANNELS = ["fluorescence_1", "fluorescence_2", "fluorescence_3", "fluorescence_4", "fluorescence_5",
                   "brightfield_1", "brightfield_2", "brightfield_3"]
_JUMP_PLATEMAP = "JUMP-Target-1_compound_platemap.tsv"
_JUMP_METADATA = "JUMP-Target-1_compound_metadata.tsv"


def _read_table(path: Path, columns: Sequence[str]) -> list[dict[str, str | None]]:
    """Rows of a parquet file or a tab-separated text file (the plate maps are published as TSV
    and as parquet under the same .tsv name), keeping ``columns``; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"JUMP-CP file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DatasetFileError(f"{path}: not a readable parquet file ({e}); it is truncated or corrupt") from e
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DatasetFileError(f"{path}: missing columns {missing} (has {table.column_names})")
        cols = {c: table.column(c).to_pylist() for c in columns}
        return [{c: (None if cols[c][k] is None else str(cols[c][k])) for c in columns} for k in range(table.num_rows)]
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetFileError(f"{path}: neither parquet nor readable tab-separated text ({e})") from e
    if not rows or any(c not in rows[0] for c in columns):
        raise DatasetFileError(f"{path}: missing columns {[c for c in columns if not rows or c not in rows[0]]}")
    return [{c: (r[c] if r[c] not in ("", "NA", "nan") else None) for c in columns} for r in rows]


def jumpcp_well_labels(platemap_dir: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """Well position -> class from the compound plate map and metadata: a well's class is its
    compound's target; wells without a target (DMSO and other controls) are class 0, the targets
    are numbered from 1 in order of first appearance in the metadata (ChannelViT's labelling)."""
    d = Path(platemap_dir)
    meta = _read_table(d / _JUMP_METADATA, ["broad_sample", "target"])
    plate = _read_table(d / _JUMP_PLATEMAP, ["well_position", "broad_sample"])
    target_of = {r["broad_sample"]: r["target"] for r in meta}
    classes = ["control"]
    for r in meta:
        t = r["target"]
        if t is not None and t not in classes:
            classes.append(t)
    wells = {}
    for r in plate:
        t = target_of.get(r["broad_sample"]) if r["broad_sample"] is not None else None
        wells[r["well_position"]] = 0 if t is None else classes.index(t)
    return wells, classes


def jumpcp_split(n: int, split: str, seed: int = 0) -> np.ndarray:
    """ChannelViT's split of the index rows: a seed-0 permutation, first 60% train, next 20% val, rest test."""
    perm = np.random.RandomState(seed).permutation(n)
    a, b = int(0.6 * n), int(0.6 * n) + int(0.2 * n)
    parts = {"train": perm[:a], "val": perm[a:b], "test": perm[b:], "all": np.arange(n)}
    if split not in parts:
        raise ValueError(f"split must be one of {list(parts)}, got {split!r}")
    return parts[split]


class JUMPCP(Dataset):
    """JUMP-CP single-cell images: 8-channel .npy files listed by a parquet index.

    Args:
        root: the ``jumpcp`` folder (``<plate>.pq``, ``<plate>/*.npy``, ``platemap_and_metadata/``).
        plate: the plate whose index to read (the benchmark's is BR00116991).
        split: "train", "val", "test" (ChannelViT's 60/20/20 random split, seed 0) or "all".
        channels: names to return, in order (default all 8).
        channel_names: names of the 8 stored channels (default ``JUMPCP_CHANNELS``).
        transform: applied to the (C, H, W) float32 tensor (uint8 images are scaled to [0, 1]).
    """

    def __init__(self, root: str | os.PathLike, plate: str = "BR00116991", split: str = "train",
                 channels: Sequence[str] | None = None, channel_names: Sequence[str] | None = None,
                 transform: Callable | None = None) -> None:
        self.root = Path(root)
        self.stored = list(channel_names) if channel_names is not None else list(JUMPCP_CHANNELS)
        if len(self.stored) != 8 or len(set(self.stored)) != 8:
            raise ValueError(f"channel_names must be 8 distinct names, got {self.stored}")
        self.channels = list(channels) if channels is not None else list(self.stored)
        bad = [c for c in self.channels if c not in self.stored]
        if bad or not self.channels:
            raise ValueError(f"channels {bad or '[]'} are not among {self.stored}")
        self._idx = [self.stored.index(c) for c in self.channels]
        self.transform = transform
        index = self.root / f"{plate}.pq"
        rows = _read_table(index, ["path", "ID", "well_loc"])
        if not rows:
            raise DatasetFileError(f"{index}: the index is empty")
        wells, self.classes = jumpcp_well_labels(self.root / "platemap_and_metadata")
        self.samples = []
        for k in jumpcp_split(len(rows), split):
            r = rows[k]
            if r["well_loc"] in wells:  # unlabelled wells are left out, as in ChannelViT
                self.samples.append((self._local(r["path"]), wells[r["well_loc"]]))

    def _local(self, path: str | None) -> Path:
        if not path:
            raise DatasetFileError(f"{self.root}: an index row has no path")
        # s3://<bucket>/jumpcp/<plate>/<file>.npy (as released) or a path relative to the root
        rel = path.split("/jumpcp/", 1)[1] if "/jumpcp/" in path else path
        return self.root / rel

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        if not path.is_file():
            raise FileNotFoundError(f"JUMP-CP image not found: {path}")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DatasetFileError(f"{path}: not a readable .npy array ({e}); it is truncated or corrupt") from e
        if arr.ndim != 3 or 8 not in (arr.shape[0], arr.shape[-1]):
            raise DatasetFileError(f"{path}: shape {arr.shape} is not an 8-channel image (8,H,W) or (H,W,8)")
        if arr.shape[0] != 8:
            arr = arr.transpose(2, 0, 1)
        x = torch.from_numpy(np.ascontiguousarray(arr[self._idx]).astype(np.float32))
        if arr.dtype == np.uint8:
            x = x / 255.0
        if self.transform is not None:
            x = self.transform(x)
        return x, label


# ------------------------------------------------------------------------ transforms, modules

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



class So2SatDataModule(_MultiChannelDataModule):
    """So2Sat LCZ42 (all 18 channels; the task chooses subsets), per-channel normalisation
    from ``stats_samples`` training samples.

    Args:
        root: folder with the h5 files; default <data root>/so2sat_lcz42.
    """

    def __init__(self, root: str | None = None, batch_size: int = 128, eval_batch_size: int = 512,
                 num_workers: int = 0, stats_samples: int = 4096) -> None:
        super().__init__(root, "so2sat_lcz42", batch_size, eval_batch_size, num_workers)
        self.stats_samples = stats_samples

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = So2SatLCZ42(self.root, "train")
        norm = ChannelNormalize(channel_stats(train, SO2SAT_CHANNELS, self.stats_samples), SO2SAT_CHANNELS)
        train.transform = norm
        self.train_set = train
        self.val_set = So2SatLCZ42(self.root, "val", transform=norm)
        self.test_set = So2SatLCZ42(self.root, "test", transform=norm)


class JUMPCPDataModule(_MultiChannelDataModule):
    """JUMP-CP plate BR00116991 (all 8 channels), ChannelViT's split, per-channel normalisation
    from ``stats_samples`` training images.

    Args:
        root: the jumpcp folder; default <data root>/jumpcp.
    """

    def __init__(self, root: str | None = None, plate: str = "BR00116991", batch_size: int = 32,
                 eval_batch_size: int = 128, num_workers: int = 0, stats_samples: int = 2048) -> None:
        super().__init__(root, "jumpcp", batch_size, eval_batch_size, num_workers)
        self.plate, self.stats_samples = plate, stats_samples

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = JUMPCP(self.root, self.plate, "train")
        norm = ChannelNormalize(channel_stats(train, train.channels, self.stats_samples), train.channels)
        train.transform = norm
        self.train_set = train
        self.val_set = JUMPCP(self.root, self.plate, "val", transform=norm)
        self.test_set = JUMPCP(self.root, self.plate, "test", transform=norm)


class _ResizeTo:
    """Bilinear resize of a (C, H, W) tensor to size x size (CHAMMI's crops differ in size)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: Tensor) -> Tensor:
        return torch.nn.functional.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                                               align_corners=False)[0]


class CHAMMIDataModule(_MultiChannelDataModule):
    """CHAMMI: training on the Train rows of the chosen sub-datasets, testing on one of its task
    splits; batches hold one sub-dataset each and come as ``(x, y, channel_names)``.

    Args:
        root: the CHAMMI folder; default <data root>/chammi.
        sub_datasets: any of "Allen", "HPA", "CP".
        test_split: the CHAMMI task split to test on ("Task_one", ...).
        val_fraction: share of Train rows held out for validation (seeded).
        img_size: images are resized to img_size x img_size.
    """

    def __init__(self, root: str | None = None, sub_datasets: Sequence[str] = ("Allen", "HPA", "CP"),
                 test_split: str = "Task_one", val_fraction: float = 0.05, img_size: int = 224,
                 batch_size: int = 64, eval_batch_size: int = 128, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(root, "chammi", batch_size, eval_batch_size, num_workers)
        if test_split not in CHAMMI_SPLITS[1:]:
            raise ValueError(f"test_split must be one of {CHAMMI_SPLITS[1:]}, got {test_split!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.sub_datasets, self.test_split, self.val_fraction = list(sub_datasets), test_split, val_fraction
        self.img_size, self.seed = img_size, seed
        self._val_groups: dict[str, list[int]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        tf = _ResizeTo(self.img_size)
        train = CHAMMI(self.root, self.sub_datasets, ["Train"], transform=tf)
        g = torch.Generator().manual_seed(self.seed)
        self._train_groups, self._val_groups = {}, {}
        for sub, idx in train.subsets().items():
            perm = [idx[j] for j in torch.randperm(len(idx), generator=g)]
            k = int(len(perm) * self.val_fraction)
            self._val_groups[sub], self._train_groups[sub] = perm[:k], perm[k:]
        self.train_set = self.val_set = train
        self.test_set = CHAMMI(self.root, self.sub_datasets, [self.test_split], classes=train.classes, transform=tf)

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


# -------------------------------------------------------------------------------- downloads

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


# So2Sat LCZ42 version 1 ("city split") as published by TUM (mediaTUM dataserv, m1454690).
SO2SAT_URL = "https://dataserv.ub.tum.de/s/m1454690/download?path=%2F&files={name}"


def download_so2sat(root: str | os.PathLike | None = None, splits: Sequence[str] = ("train", "val", "test")) -> Path:
    """Fetch the So2Sat LCZ42 h5 files (about 50 GB in all). The owners publish no checksum
    with these links, so each file is checked instead by opening it and validating every
    dataset's shape (``So2SatLCZ42``); its SHA-256 is printed for your records."""
    root = Path(root) if root else default_data_root() / "so2sat_lcz42"
    for split in splits:
        name = _H5_SPLITS[split]
        dest = root / name
        if not dest.is_file():
            _fetch(SO2SAT_URL.format(name=name), dest)
        So2SatLCZ42(root, split)  # raises DatasetFileError on a bad download
        h = hashlib.sha256()
        with open(dest, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        print(f"{dest}: sha256 {h.hexdigest()}")
    return root


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


JUMPCP_BUCKET = "https://insitro-research-2023-context-vit.s3.amazonaws.com/jumpcp/"


def download_jumpcp(root: str | os.PathLike | None = None, plate: str = "BR00116991", images: bool = True) -> Path:
    """Fetch the JUMP-CP release of ContextViT / ChannelViT from its public S3 bucket over HTTPS:
    the plate's parquet index, the plate maps and (``images=True``) every .npy the index lists.
    S3 reports each object's MD5 as its ETag for single-part uploads; it is checked where present."""
    root = Path(root) if root else default_data_root() / "jumpcp"

    def get(rel: str) -> Path:
        url = JUMPCP_BUCKET + rel
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=60) as resp:
            etag = (resp.headers.get("ETag") or "").strip('"')
        md5 = etag if len(etag) == 32 and "-" not in etag else None
        return _fetch(url, root / rel, md5)

    get(f"{plate}.pq")
    for name in (_JUMP_PLATEMAP, _JUMP_METADATA):
        get(f"platemap_and_metadata/{name}")
    if images:
        for r in _read_table(root / f"{plate}.pq", ["path"]):
            rel = r["path"].split("/jumpcp/", 1)[1] if "/jumpcp/" in (r["path"] or "") else r["path"]
            if rel and not (root / rel).is_file():
                get(rel)
    return root

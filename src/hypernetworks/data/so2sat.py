"""So2Sat LCZ42 (Zhu et al., 2020) in its published HDF5 format.

The files read here are the **version 2** release, whose files are the "city split" (DiChaViT's
README: "We use the city split (version 2)"): ``training.h5`` / ``validation.h5`` /
``testing.h5``, each with ``sen1`` (N, 32, 32, 8) Sentinel-1 SAR, ``sen2`` (N, 32, 32, 10)
Sentinel-2 bands and a one-hot ``label`` (N, 17). Read lazily with h5py (one sample per access; the files are about 50 GB).
``So2SatLCZ42`` returns ``(image, label)`` with image a float32 (C, 32, 32) tensor; missing files
raise FileNotFoundError, truncated or corrupt ones ``DatasetFileError`` naming the file.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from hypernetworks.data.channel_utils import ChannelNormalize, _fetch, _MultiChannelDataModule, channel_stats
from hypernetworks.data.images import DatasetFileError, default_data_root

__all__ = ["So2SatLCZ42", "So2SatDataModule", "SO2SAT_CHANNELS", "SO2SAT_METADATA", "SO2SAT_CLASSES",
           "SO2SAT_VERSION", "download_so2sat"]

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
        split: "train", "val" or "test" (the official files of version 2: its "city split").
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


class So2SatDataModule(_MultiChannelDataModule):
    """So2Sat LCZ42 version 2, city split (all 18 channels; the task chooses subsets), per-channel
    normalisation from ``stats_samples`` training samples.

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


# The release these files are: So2Sat LCZ42 version 2, whose training / validation / testing files
# are the "city split" (training cities disjoint from the validation and testing cities), as
# published by TUM (mediaTUM dataserv, m1454690); DiChaViT trains and tests on this split.
SO2SAT_VERSION = "LCZ42 version 2 (city split)"
SO2SAT_URL = "https://dataserv.ub.tum.de/s/m1454690/download?path=%2F&files={name}"


def download_so2sat(root: str | os.PathLike | None = None, splits: Sequence[str] = ("train", "val", "test")) -> Path:
    """Fetch the So2Sat LCZ42 version 2 (city split) h5 files (about 50 GB in all). The owners publish no checksum
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


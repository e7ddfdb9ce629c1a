"""JUMP-CP: the ContextViT / ChannelViT release of plate BR00116991 of cpg0000, in its published format.

A parquet index (``BR00116991.pq``: ``path`` of an 8-channel ``.npy`` image, ``ID``, ``well_loc``)
and the JUMP-Target-1 plate map + compound metadata (``platemap_and_metadata/``), from which a
well's label is its compound's target (controls = class 0; 161 classes), split 60/20/20 at random
with seed 0 as in ChannelViT. ``JUMPCP`` returns ``(image, label)``, image a float32 (C, H, W) tensor.
"""
from __future__ import annotations

import csv
import math
import os
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from hypernetworks.data.channel_utils import ChannelNormalize, _fetch, _MultiChannelDataModule, channel_stats
from hypernetworks.data.images import DatasetFileError, default_data_root

__all__ = ["JUMPCP", "JUMPCPDataModule", "JUMPCP_CHANNELS", "JUMPCP_METADATA", "jumpcp_split",
           "jumpcp_well_labels", "download_jumpcp"]

# The 8 stored channels in the order of the released .npy files, named as ChannelViT's published
# dataset config (channelvit/config/data/jumpcp.yaml) names them: five Cell Painting stains, then
# two defocused brightfield planes and the in-focus one (ChannelViT's "brightfield" set is 5-7).
JUMPCP_CHANNELS = ["Mito", "AGP", "RNA", "ER", "DNA", "HighZBF", "LowZBF", "Brightfield"]


def _fluor(excitation_nm: float, emission_nm: float) -> list[float]:
    return [math.log10(excitation_nm), math.log10(emission_nm), 1.0, 0.0, 0.0]


def _bright(focus: float) -> list[float]:
    return [0.0, 0.0, 0.0, 1.0, focus]


# The generator input for metadata conditioning: log10 excitation and emission peak (nm) of the
# stain's fluorophore, fluorescence flag, brightfield flag, focal plane (+1 above, -1 below, 0 in
# focus). The fluorophores are those of the Cell Painting protocol (Bray et al., 2016) and the
# numbers their nominal excitation / emission peaks, not the microscope's filter sets: Mito =
# MitoTracker Deep Red (644/665), AGP = phalloidin Alexa Fluor 568 (578/603; with WGA Alexa Fluor
# 555), RNA = SYTO 14 (517/549), ER = concanavalin A Alexa Fluor 488 (495/519), DNA = Hoechst 33342
# (350/461). Brightfield is transmitted white light (no wavelength: zeros and the flag).
JUMPCP_METADATA: dict[str, list[float]] = {
    "Mito": _fluor(644, 665), "AGP": _fluor(578, 603), "RNA": _fluor(517, 549), "ER": _fluor(495, 519),
    "DNA": _fluor(350, 461), "HighZBF": _bright(1.0), "LowZBF": _bright(-1.0), "Brightfield": _bright(0.0),
}
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

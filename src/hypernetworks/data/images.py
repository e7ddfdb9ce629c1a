"""MNIST and CIFAR-10, torchvision-style (``root``, ``train``, ``transform``, ``download``), with
plain-torch transforms and LightningDataModules.

Sources, in the order they are looked for under ``root``:
- MNIST: the four IDX files (``train-images-idx3-ubyte[.gz]`` ...), e.g. <data folder>/mnist;
  ``download=True`` fetches the official files and checks their MD5.
- CIFAR-10: the official python batches (``cifar-10-batches-py/``; ``download=True`` fetches and
  checks ``cifar-10-python.tar.gz``), or else a JPEG tarball ``cifar10_jpg.tar.gz`` holding
  ``{train,test}/<class>/NNNN.jpg`` (e.g. <data folder>/cifar10). Decoding 60k JPEGs takes a while,
  so the decoded uint8 arrays are cached as .npy files in ``cache_dir`` (default
  $HYPERNETWORKS_CACHE or ~/.cache/hypernetworks), never next to the read-only source.

Images come out as uint8 tensors (C, H, W); labels as ints. Missing, truncated or corrupt files
raise FileNotFoundError / DatasetFileError naming the file.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule

from hypernetworks.data.root import data_root, dataset_dir, require_files
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "DatasetFileError", "read_idx", "download_url", "MNIST", "CIFAR10", "CIFAR10_CLASSES",
    "Compose", "ToFloat", "Normalize", "RandomCrop", "RandomHorizontalFlip",
    "MNISTDataModule", "CIFAR10DataModule", "default_data_root", "class_balanced_order",
]


class DatasetFileError(RuntimeError):
    """A dataset file exists but is truncated, corrupt or not what it should be."""


def default_data_root() -> Path:
    """The data folder: $HYPERNETWORKS_DATA, else the per-user data directory (see hypernetworks.data.root)."""
    return data_root()


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("HYPERNETWORKS_CACHE", Path.home() / ".cache" / "hypernetworks"))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_url(urls: str | Sequence[str], dest: str | os.PathLike, md5: str) -> Path:
    """Download to ``dest`` (trying each mirror in turn), check the MD5, move into place atomically."""
    dest = Path(dest)
    if dest.exists() and _md5(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in [urls] if isinstance(urls, str) else urls:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                shutil.copyfileobj(resp, out)
            got = _md5(Path(tmp))
            if got != md5:
                raise DatasetFileError(f"{url}: MD5 {got} differs from the expected {md5}")
            os.replace(tmp, dest)
            return dest
        except Exception as e:  # next mirror
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DatasetFileError(f"could not download {dest.name}:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------------------------------- MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array, checking header and length."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DatasetFileError(f"{path}: cannot decompress ({e}); the file is truncated or corrupt") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DatasetFileError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFileError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetFileError(f"{path}: {len(raw)} bytes but the header {shape} needs {expected}; "
                               "the file is truncated or corrupt")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class _ImageDataset(Dataset):
    data: Tensor  # (N, C, H, W) uint8
    targets: Tensor  # (N,) int64

    def __init__(self, transform: Callable | None, target_transform: Callable | None) -> None:
        self.transform, self.target_transform = transform, target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img, target = self.data[i], int(self.targets[i])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


class MNIST(_ImageDataset):
    """MNIST from the four IDX files in ``root`` (gzipped or not)."""

    mirrors = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
    resources = {  # official files and their MD5
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    classes = [str(i) for i in range(10)]

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Callable | None = None,
                 target_transform: Callable | None = None, download: bool = False) -> None:
        super().__init__(transform, target_transform)
        self.root, self.train = Path(root), train
        prefix = "train" if train else "t10k"
        if download:
            self.download()
        images = read_idx(self._find(f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(self._find(f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetFileError(f"{self.root}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        if labels.size and labels.max() > 9:
            raise DatasetFileError(f"{self._find(f'{prefix}-labels-idx1-ubyte')}: label {labels.max()} out of range 0-9")
        self.data = torch.from_numpy(images.copy()).unsqueeze(1)
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def _find(self, stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (self.root / name).is_file():
                return self.root / name
        raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {self.root} (pass download=True to fetch it)")

    def download(self) -> None:
        for stem, md5 in self.resources.items():
            if not any((self.root / n).is_file() for n in (stem + ".gz", stem)):
                download_url([m + stem + ".gz" for m in self.mirrors], self.root / (stem + ".gz"), md5)


# ------------------------------------------------------------------------------------- CIFAR-10

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _BatchUnpickler(pickle.Unpickler):
    """Reads the official CIFAR python batches without running arbitrary code: only the numpy
    array reconstruction those files use (and _codecs.encode, which protocol-2 pickles written by
    python 3 use for bytes) is allowed."""

    _allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct, either layout
        return getattr(np, name)


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:
        raise DatasetFileError(f"{path}: not a readable CIFAR-10 python batch ({e})") from e
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DatasetFileError(f"{path}: data {data.shape} / labels {labels.shape} are not CIFAR-10 batches")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFileError(f"{path}: labels out of range 0-9")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10_jpeg_tar(path: str | os.PathLike, train: bool = True,
                          limit_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``{train,test}/<class>/NNNN.jpg`` from a tarball into (N, 3, 32, 32) uint8 and (N,) labels,
    ordered by class then file name. ``limit_per_class`` decodes only the first files of each class."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 JPEG tarball not found: {path}")
    split = "train" if train else "test"
    found: dict[tuple[int, str], np.ndarray] = {}
    per_class = [0] * 10
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if found and parts[0] != split:
                    break  # members are grouped by split: ours is done
                if limit_per_class is not None and min(per_class) >= limit_per_class:
                    break
                if not member.isfile() or len(parts) != 3 or parts[0] != split or not parts[2].endswith(".jpg"):
                    continue
                if parts[1] not in CIFAR10_CLASSES:
                    raise DatasetFileError(f"{path}: member {member.name} has unknown class {parts[1]!r}")
                c = CIFAR10_CLASSES.index(parts[1])
                if limit_per_class is not None and per_class[c] >= limit_per_class:
                    continue
                blob = tar.extractfile(member).read()
                try:
                    with Image.open(io.BytesIO(blob)) as im:
                        arr = np.asarray(im.convert("RGB"))
                except Exception as e:
                    raise DatasetFileError(f"{path}: member {member.name} is not a decodable image ({e})") from e
                if arr.shape != (32, 32, 3):
                    raise DatasetFileError(f"{path}: member {member.name} is {arr.shape}, not 32x32 RGB")
                found[(c, parts[2])] = arr.transpose(2, 0, 1)
                per_class[c] += 1
            # a compressed stream is read to its end so that its checksum is verified even when
            # limit_per_class stopped early (the gzip/bz2/xz trailer check; at most one decompression of
            # the file: 0.46 s for CIFAR-10's 93 MB, measured on the busy 2-core development machine)
            stream = tar.fileobj
            if stream is not None and type(stream).__module__ in ("gzip", "bz2", "lzma"):
                while stream.read(1 << 20):
                    pass
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DatasetFileError(f"{path}: cannot read the tarball ({type(e).__name__}: {e}); it is truncated or "
                               "corrupt") from e
    if not found:
        raise DatasetFileError(f"{path}: no {split}/<class>/*.jpg members")
    # tarfile ends its iteration silently at a truncated or garbled header, so missing images are
    # only seen in the counts: every class must have its full count (or limit_per_class of it)
    full = 5000 if train else 1000
    expected = full if limit_per_class is None else min(limit_per_class, full)
    if per_class != [expected] * 10:
        raise DatasetFileError(f"{path}: {split} images per class {per_class}, expected {expected} each; the "
                               "tarball is truncated or damaged")
    keys = sorted(found)
    return np.stack([found[k] for k in keys]), np.array([k[0] for k in keys], dtype=np.int64)


class CIFAR10(_ImageDataset):
    """CIFAR-10 from the official python batches in ``root/cifar-10-batches-py`` or, failing that,
    from the JPEG tarball ``root/cifar10_jpg.tar.gz`` (decoded once, cached in ``cache_dir``).

    ``limit_per_class`` (JPEG tarball only) reads just the first files of each class; not cached.
    """

    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    archive, archive_md5 = "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
    batch_dir = "cifar-10-batches-py"
    jpeg_tarball = "cifar10_jpg.tar.gz"
    classes = CIFAR10_CLASSES

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Callable | None = None,
                 target_transform: Callable | None = None, download: bool = False,
                 cache_dir: str | os.PathLike | None = None, limit_per_class: int | None = None) -> None:
        super().__init__(transform, target_transform)
        self.root, self.train = Path(root), train
        batches, tarball = self.root / self.batch_dir, self.root / self.jpeg_tarball
        if download and not batches.is_dir() and not tarball.is_file():
            self.download()
        if batches.is_dir():
            names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
            parts = [_read_python_batch(batches / n) for n in names]
            data, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        elif tarball.is_file():
            data, labels = self._jpeg(tarball, _cache_dir(cache_dir), limit_per_class)
        else:
            raise FileNotFoundError(f"CIFAR-10 not found in {self.root}: expected {self.batch_dir}/ or "
                                    f"{self.jpeg_tarball} (pass download=True to fetch the python batches)")
        self.data, self.targets = torch.from_numpy(data), torch.from_numpy(labels)

    def _jpeg(self, tarball: Path, cache: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        if limit is not None:
            return read_cifar10_jpeg_tar(tarball, self.train, limit)
        st = tarball.stat()
        key = hashlib.sha1(f"{tarball.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        split = "train" if self.train else "test"
        files = [cache / f"cifar10_jpg-{key}-{split}-{kind}.npy" for kind in ("images", "labels")]
        if all(f.is_file() for f in files):
            try:
                return tuple(np.load(f, allow_pickle=False) for f in files)  # type: ignore[return-value]
            except (OSError, ValueError):
                pass  # a damaged cache is rebuilt below
        data, labels = read_cifar10_jpeg_tar(tarball, self.train)
        cache.mkdir(parents=True, exist_ok=True)
        for f, arr in zip(files, (data, labels)):
            tmp = f.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, f)
        return data, labels

    def download(self) -> None:
        archive = download_url(self.url, self.root / self.archive, self.archive_md5)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(self.root, filter="data")


# ----------------------------------------------------------------------------------- transforms

class Compose:
    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToFloat:
    """uint8 (C, H, W) -> float32 in [0, 1]."""

    def __call__(self, x: Tensor) -> Tensor:
        return x.float().div_(255.0)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class RandomCrop:
    """Zero-pad by ``padding`` on every side, then crop a random ``size`` x ``size`` window."""

    def __init__(self, size: int, padding: int = 0) -> None:
        self.size, self.padding = size, padding

    def __call__(self, x: Tensor) -> Tensor:
        if self.padding:
            x = F.pad(x, (self.padding,) * 4)
        h, w = x.shape[-2:]
        if h < self.size or w < self.size:
            raise ValueError(f"RandomCrop: image {h}x{w} is smaller than size={self.size}")
        i = int(torch.randint(h - self.size + 1, ()))
        j = int(torch.randint(w - self.size + 1, ()))
        return x[..., i:i + self.size, j:j + self.size]


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: Tensor) -> Tensor:
        return x.flip(-1) if float(torch.rand(())) < self.p else x


# ------------------------------------------------------------------------------ data modules

class SplitLoaders:
    """Train/val/test DataLoaders over ``train_set``/``val_set``/``test_set`` (shuffled, whole
    batches for training), shared by the image and multi-channel data modules."""

    batch_size: int
    eval_batch_size: int
    num_workers: int

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
                          drop_last=train, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


def class_balanced_order(targets: Tensor, seed: int = 0) -> list[int]:
    """Indices of ``targets`` in a seeded order that deals the classes out in turn: each class's
    items are shuffled (``torch.Generator().manual_seed(seed)``), then taken one per class per round,
    the classes of a round in a random order. Every prefix of the order is a random sample whose class
    counts differ by at most one (as long as no class has run out), so a validation pass cut short
    (``limit_val_batches``) still sees every class evenly; the whole order is a permutation."""
    n = len(targets)
    if n == 0:
        return []
    targets = torch.as_tensor(targets, dtype=torch.long)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    t = targets[perm]
    grouped = torch.argsort(t, stable=True)  # by class, shuffled within each class
    counts = torch.bincount(t)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[grouped] = torch.arange(n) - starts[t[grouped]]  # position of each item within its class
    return perm[torch.argsort(rank * n + torch.arange(n))].tolist()


class _ImageDataModule(SplitLoaders, LightningDataModule):
    """Train / validation / test loaders.

    Validation set:

    * ``val_size > 0``: ``val_size`` training images held out at random (a permutation seeded by the
      data module's own ``seed`` argument, default 0, not by ``seed_everything``, so runs with
      different global seeds validate on the same images); training uses the rest (disjoint).
      For CIFAR-10 with ``val_size=1000`` (the channel recipes; seed 0) that is 91-116 images per class.
    * ``val_size == 0``: the whole test set, served in :func:`class_balanced_order` (seeded by
      ``seed`` as well), so that the first N validation images, which is what ``limit_val_batches``
      evaluates, are a class-balanced random sample; with the full set the metrics are unchanged.
      (The JPEG copy of CIFAR-10 stores its test images sorted by class: before this order, the
      first 1,000 were all airplanes.) The test loader still reads the test set in file order.
    """

    def __init__(self, batch_size: int, eval_batch_size: int, val_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size}, {eval_batch_size}")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.num_workers, self.seed = val_size, num_workers, seed
        self.train_set = self.val_set = self.test_set = None

    def load(self, train: bool) -> _ImageDataset:
        raise NotImplementedError

    def transform(self, augment: bool) -> Callable:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, test = self.load(True), self.load(False)
        # Views that share the decoded tensors and differ only in their transform.
        train_aug, train_plain, self.test_set = (copy.copy(train), copy.copy(train), copy.copy(test))
        train_aug.transform = self.transform(True)
        train_plain.transform = self.test_set.transform = self.transform(False)
        n = len(train_aug)
        if self.val_size >= n:
            raise ValueError(f"val_size={self.val_size} leaves no training data (train has {n})")
        if self.val_size:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
            self.train_set = Subset(train_aug, perm[self.val_size:])
            self.val_set = Subset(train_plain, perm[:self.val_size])
        else:
            self.train_set = train_aug
            self.val_set = Subset(self.test_set, class_balanced_order(self.test_set.targets, self.seed))


class MNISTDataModule(_ImageDataModule):
    """MNIST with the paper's augmentation (pad to 30, random 28x28 crop) and normalisation.

    Args:
        root: folder with the IDX files; default <data folder>/mnist (see hypernetworks.data.root).
        val_size: training images held out for validation, a random sample seeded by ``seed`` (0: validate
            on the test set, in a class-balanced seeded order; see ``_ImageDataModule``).
        download: fetch missing files from the official mirrors into ``root`` (default on).
    """

    mean, std = (0.1307,), (0.3081,)

    def __init__(self, root: str | None = None, batch_size: int = 100, eval_batch_size: int = 1000,
                 val_size: int = 5000, augment: bool = True, num_workers: int = 0, download: bool = True,
                 seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, val_size, num_workers, seed)
        self._root_given = bool(root)
        self.root = dataset_dir("mnist", root or None)
        self.augment, self.download = augment, download

    def check_data(self) -> None:
        """Raise DataNotFoundError if an IDX file is missing and will not be downloaded."""
        require_files("mnist", [[self.root / (stem + ".gz"), self.root / stem] for stem in MNIST.resources],
                      explicit=self._root_given, download=self.download)

    def prepare_data(self) -> None:
        self.check_data()

    def load(self, train: bool) -> MNIST:
        return MNIST(self.root, train=train, download=self.download)

    def transform(self, augment: bool) -> Callable:
        steps: list[Callable] = [RandomCrop(28, padding=1)] if (augment and self.augment) else []
        return Compose(steps + [ToFloat(), Normalize(self.mean, self.std)])


class CIFAR10DataModule(_ImageDataModule):
    """CIFAR-10 with the standard augmentation (4-pixel zero pad + random 32x32 crop, horizontal flip).

    Args:
        root: folder with cifar-10-batches-py/ or cifar10_jpg.tar.gz; default <data folder>/cifar10.
        val_size: training images held out for validation, a random sample seeded by ``seed`` (default 0:
            validate on the test set, served in a class-balanced seeded order, so that the first N
            images, e.g. ``limit_val_batches: 2`` of 500, hold every class evenly; see ``_ImageDataModule``).
        download: fetch the official python batches into ``root`` when neither is there (default on).
        cache_dir: where decoded JPEGs are cached (default $HYPERNETWORKS_CACHE or ~/.cache/hypernetworks).
        limit_per_class: read only this many images per class and split (for quick runs).
        seed: seeds the validation split and order only (not ``seed_everything``), so it is the same
            in every run unless set.
    """

    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(self, root: str | None = None, batch_size: int = 128, eval_batch_size: int = 500,
                 val_size: int = 0, augment: bool = True, num_workers: int = 0, download: bool = True,
                 cache_dir: str | None = None, limit_per_class: int | None = None, seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, val_size, num_workers, seed)
        self._root_given = bool(root)
        self.root = dataset_dir("cifar10", root or None)
        self.augment, self.download, self.cache_dir = augment, download, cache_dir
        self.limit_per_class = limit_per_class

    def check_data(self) -> None:
        """Raise DataNotFoundError if neither source is present and nothing will be downloaded."""
        require_files("cifar10", [[self.root / CIFAR10.batch_dir, self.root / CIFAR10.jpeg_tarball]],
                      explicit=self._root_given, download=self.download)

    def prepare_data(self) -> None:
        self.check_data()

    def load(self, train: bool) -> CIFAR10:
        return CIFAR10(self.root, train=train, download=self.download, cache_dir=self.cache_dir,
                       limit_per_class=self.limit_per_class)

    def transform(self, augment: bool) -> Callable:
        steps: list[Callable] = [RandomCrop(32, padding=4), RandomHorizontalFlip()] if (augment and self.augment) else []
        return Compose(steps + [ToFloat(), Normalize(self.mean, self.std)])

"""Character-level text data: Penn Treebank (Mikolov's char files), enwik8 (raw bytes), and the
``pydoc_data.topics`` text that ships with CPython (the demo's data: no download, no data folder).

Batching follows the paper (and Zaremba et al.): a split of N symbols is cut into B contiguous
streams; the streams are read side by side in windows of ``seq_len`` steps and the model carries its
(detached) state from one window to the next. Targets tile positions 1..N-1 exactly once: stream
b's inputs end where stream b+1's inputs begin, so every symbol except the first is predicted
exactly once per epoch; streams are at most one symbol apart in length and the shorter ones are
padded with ``IGNORE_INDEX`` targets (masked out of the loss).

Each batch is ``(x, y, window)``: ``x`` and ``y`` are (B, T) int64, ``window`` the window's index in
the epoch (0 means "start of the streams: reset the state").

The vocabulary is built from the training split only. Symbols of valid/test that train never
contains are handled by ``unknown``: ``"error"`` (raise, naming the symbols), ``"unk"`` (a reserved
symbol, ``UNK``, is part of the vocabulary) or ``"skip"`` (dropped, with a warning giving the count).
"""
from __future__ import annotations

import bz2
import math
import os
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from hypernetworks.data.root import dataset_dir, require_files

IGNORE_INDEX = -100
UNK = "\ufffd"  # the Unicode replacement character stands for any symbol unseen in training
UnknownPolicy = Literal["error", "unk", "skip"]

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_BYTES = 100_000_000


# ----------------------------------------------------------------------------- vocabulary

class Vocabulary:
    """Symbols (one-character strings) <-> ids. ``symbols`` is the id order."""

    def __init__(self, symbols: Sequence[str], unknown: UnknownPolicy = "error") -> None:
        if unknown not in ("error", "unk", "skip"):
            raise ValueError(f"unknown must be 'error', 'unk' or 'skip'; got {unknown!r}")
        symbols = list(symbols)
        if unknown == "unk" and UNK not in symbols:
            symbols.append(UNK)
        if len(set(symbols)) != len(symbols):
            raise ValueError("vocabulary symbols must be distinct")
        bad = [s for s in symbols if not isinstance(s, str) or len(s) != 1]
        if bad:
            raise ValueError(f"vocabulary symbols must be single characters; got {bad[:5]!r}")
        self.symbols = symbols
        self.unknown = unknown
        self.index = {s: i for i, s in enumerate(symbols)}

    @classmethod
    def from_text(cls, text: str, unknown: UnknownPolicy = "error") -> "Vocabulary":
        return cls(sorted(set(text)), unknown)

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, text: str, where: str = "text") -> torch.Tensor:
        """ids of ``text`` (int64); unseen symbols follow the ``unknown`` policy."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        uniq, inverse = np.unique(codes, return_inverse=True)
        lut = np.full(len(uniq), -1, dtype=np.int64)
        missing = []
        for j, cp in enumerate(uniq.tolist()):
            i = self.index.get(chr(cp))
            if i is None:
                missing.append(chr(cp))
            else:
                lut[j] = i
        ids = lut[inverse]
        if missing:
            n = int((ids < 0).sum())
            if self.unknown == "error":
                raise ValueError(f"{where}: {n} characters not in the training vocabulary: {sorted(missing)[:20]!r} "
                                 "(set unknown='unk' or 'skip')")
            if self.unknown == "unk":
                ids[ids < 0] = self.index[UNK]
            else:
                warnings.warn(f"{where}: skipped {n} characters not in the training vocabulary", stacklevel=2)
                ids = ids[ids >= 0]
        return torch.from_numpy(ids)

    def decode(self, ids) -> str:
        return "".join(self.symbols[int(i)] for i in ids)


# ----------------------------------------------------------------------------- readers

def read_ptb_char(path: str | os.PathLike) -> str:
    """One of Mikolov's ``ptb.char.*.txt`` files as text: tokens are separated by single spaces,
    ``_`` is a space of the original text and a newline is its own token."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PTB char file not found: {path} (expected Mikolov's ptb.char.*.txt)")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    tokens = [t for t in raw.split(" ") if t]
    if not tokens:
        raise ValueError(f"{path}: empty PTB char file")
    bad = next((t for t in tokens if len(t) != 1), None)
    if bad is not None:
        raise ValueError(f"{path}: not a PTB char file: token {bad[:20]!r} is not a single character "
                         "(is this the word-level ptb.*.txt?)")
    return "".join(tokens).replace("_", " ")


def contiguous_split(n: int, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> list[slice]:
    """Contiguous train/valid/test slices of ``n`` items in the given proportions."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1; got {fractions!r}")
    a = int(round(n * fractions[0]))
    b = a + int(round(n * fractions[1]))
    return [slice(0, a), slice(a, b), slice(b, n)]


def pydoc_text() -> str:
    """The English text of ``pydoc_data.topics`` (every CPython has it), topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def _bytes_to_text(data: bytes) -> str:
    # bytes are symbols: latin-1 maps byte b to the character chr(b), one to one
    return data.decode("latin-1")


def read_enwik8_bytes(path: str | os.PathLike) -> bytes:
    """Raw bytes of enwik8 (``enwik8`` or ``enwik8.zip``) or of any stand-in (``.bz2`` or raw file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"enwik8 file not found: {path} (pass download=True, or the path of a stand-in)")
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                data = z.read("enwik8") if "enwik8" in names else None
            if data is None:
                raise ValueError(f"{path}: zip archive has no member 'enwik8' (has {names[:5]})")
            return data
        if path.suffix == ".bz2":
            return bz2.decompress(path.read_bytes())
        return path.read_bytes()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or unreadable archive ({type(e).__name__}: {e})") from None
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: corrupt archive ({e})") from None


def enwik8_splits(data: bytes) -> list[bytes]:
    """The Hutter-prize protocol: first 90M bytes train, next 5M valid, last 5M test; any other
    length (a stand-in) is split 90/5/5 contiguously in the same way."""
    if len(data) == ENWIK8_BYTES:
        return [data[:90_000_000], data[90_000_000:95_000_000], data[95_000_000:]]
    return [data[s] for s in contiguous_split(len(data))]


def download_enwik8(root: str | os.PathLike) -> Path:
    """Download ``enwik8.zip`` (36 MB) from the Hutter prize page into ``root`` (users only; tests
    never call it)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / "enwik8.zip"
    if not target.exists():
        tmp = target.with_suffix(".zip.part")
        urllib.request.urlretrieve(ENWIK8_URL, tmp)
        os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------- stream batching

class StreamBatches:
    """An epoch of (x, y, window) batches over ``data`` cut into ``batch_size`` contiguous streams.

    ``rank``/``world_size`` give this process its contiguous block of ``batch_size / world_size``
    streams (data parallel); every rank has the same number of windows. The object is resumable
    (``state_dict``/``load_state_dict``): Lightning stores the position in mid-epoch checkpoints.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive; got {seq_len}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} are inconsistent")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world_size}")
        data = torch.as_tensor(data).reshape(-1)
        n = data.numel() - 1  # number of targets
        if n < batch_size:
            raise ValueError(f"a split of {data.numel()} symbols is too short for batch_size={batch_size} streams")
        self.batch_size, self.seq_len = batch_size, seq_len
        q, r = divmod(n, batch_size)
        lengths = [q + (b < r) for b in range(batch_size)]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        self.stream_len = q + (r > 0)
        rows = range(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        small = data.dtype if data.dtype in (torch.uint8, torch.int16, torch.int32) else torch.int64
        self.inputs = torch.zeros(len(rows), self.stream_len, dtype=small)
        self.targets = torch.full((len(rows), self.stream_len), IGNORE_INDEX, dtype=torch.int32 if small != torch.int64 else torch.int64)
        for j, b in enumerate(rows):
            s, m = starts[b], lengths[b]
            self.inputs[j, :m] = data[s:s + m]
            self.targets[j, :m] = data[s + 1:s + m + 1]
        self._start = 0  # window to start from (set by load_state_dict)
        self._yielded = 0

    def __len__(self) -> int:
        return math.ceil(self.stream_len / self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        start, self._start = self._start, 0
        self._yielded = start
        for k in range(start, len(self)):
            sl = slice(k * self.seq_len, (k + 1) * self.seq_len)
            self._yielded = k + 1
            yield self.inputs[:, sl].long(), self.targets[:, sl].long(), k

    # Lightning does not prefetch from a loader with a length, so every window handed out has
    # been trained on when a checkpoint is written.
    def state_dict(self) -> dict:
        return {"next_window": self._yielded % max(1, len(self))}

    def load_state_dict(self, state: dict) -> None:
        self._start = int(state.get("next_window", 0))


# ----------------------------------------------------------------------------- data modules

@dataclass
class _Splits:
    train: str
    valid: str
    test: str


class CharStreamDataModule(LightningDataModule):
    """Base class: subclasses implement ``read_splits()`` returning train/valid/test text."""

    def __init__(self, batch_size: int = 128, seq_len: int = 100, eval_batch_size: int = 16,
                 eval_seq_len: int | None = None, unknown: UnknownPolicy = "error") -> None:
        super().__init__()
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("eval_batch_size", eval_batch_size)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        if eval_seq_len is not None and eval_seq_len <= 0:
            raise ValueError(f"eval_seq_len must be positive; got {eval_seq_len!r}")
        if unknown not in ("error", "unk", "skip"):
            raise ValueError(f"unknown must be 'error', 'unk' or 'skip'; got {unknown!r}")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.eval_batch_size, self.eval_seq_len = eval_batch_size, eval_seq_len or seq_len
        self.unknown = unknown
        self._vocab: Vocabulary | None = None
        self._ids: dict[str, torch.Tensor] = {}

    def read_splits(self) -> _Splits:
        raise NotImplementedError

    def _load(self) -> None:
        if self._ids:
            return
        splits = self.read_splits()
        self._vocab = Vocabulary.from_text(splits.train, self.unknown)
        dtype = torch.uint8 if len(self._vocab) <= 256 else torch.int32
        for name in ("train", "valid", "test"):
            self._ids[name] = self._vocab.encode(getattr(splits, name), where=f"{self.name} {name} split").to(dtype)

    name = "text"

    @property
    def vocab(self) -> Vocabulary:
        self._load()
        return self._vocab

    def split_ids(self, split: str) -> torch.Tensor:
        self._load()
        return self._ids[split]

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _streams(self, split: str, batch_size: int, seq_len: int) -> StreamBatches:
        rank, world = self._rank()
        return StreamBatches(self.split_ids(split), batch_size, seq_len, rank, world)

    def train_dataloader(self) -> StreamBatches:
        return self._streams("train", self.batch_size, self.seq_len)

    def val_dataloader(self) -> StreamBatches:
        return self._streams("valid", self.eval_batch_size, self.eval_seq_len)

    def test_dataloader(self) -> StreamBatches:
        return self._streams("test", self.eval_batch_size, self.eval_seq_len)


class PTBCharDataModule(CharStreamDataModule):
    """Character-level Penn Treebank from Mikolov's ``ptb.char.{train,valid,test}.txt`` (50 symbols)."""

    name = "PTB char"

    def __init__(self, root: str | None = None, batch_size: int = 128, seq_len: int = 100,
                 eval_batch_size: int = 16, eval_seq_len: int | None = None, unknown: UnknownPolicy = "error") -> None:
        super().__init__(batch_size, seq_len, eval_batch_size, eval_seq_len, unknown)
        # root=None: <data folder>/ptb, the folder resolved now (hypernetworks.data.root)
        self._root_given = root is not None
        self.root = str(dataset_dir("ptb", root))

    def check_data(self) -> None:
        """Raise DataNotFoundError (one paragraph: which files, where, what to do) if a split is missing."""
        root = Path(self.root)
        require_files("ptb", [[root / f"ptb.char.{s}.txt"] for s in ("train", "valid", "test")],
                      explicit=self._root_given)

    def prepare_data(self) -> None:
        self.check_data()

    def read_splits(self) -> _Splits:
        root = Path(self.root)
        return _Splits(*(read_ptb_char(root / f"ptb.char.{s}.txt") for s in ("train", "valid", "test")))


class Enwik8DataModule(CharStreamDataModule):
    """enwik8 as bytes (90M/5M/5M). ``path`` is ``enwik8``/``enwik8.zip`` or a stand-in file split
    90/5/5 by the same protocol (e.g. the 6 MB Wikipedia XML excerpt in gensim's test data).
    Default: ``<data folder>/enwik8/enwik8.zip`` (hypernetworks.data.root), downloaded there (36 MB)
    from the Hutter prize page when missing; ``download=False`` never goes online."""

    name = "enwik8"

    def __init__(self, path: str | None = None, download: bool = True, batch_size: int = 128, seq_len: int = 250,
                 eval_batch_size: int = 16, eval_seq_len: int | None = None, unknown: UnknownPolicy = "unk") -> None:
        super().__init__(batch_size, seq_len, eval_batch_size, eval_seq_len, unknown)
        self._path_given = path is not None
        self.path = path if path is not None else str(dataset_dir("enwik8") / "enwik8.zip")
        self.download = download

    def check_data(self) -> None:
        """Raise DataNotFoundError if the file is missing and will not be downloaded."""
        p = Path(self.path).expanduser()
        require_files("enwik8", [[p, p.parent / "enwik8.zip"] if self.download else [p]],
                      explicit=self._path_given, option="path")

    def prepare_data(self) -> None:
        p = Path(self.path).expanduser()
        if self.download and not p.exists():
            download_enwik8(p.parent)
        self.check_data()

    def read_splits(self) -> _Splits:
        p = Path(self.path).expanduser()
        if self.download and not p.exists():
            p = p.parent / "enwik8.zip"
        return _Splits(*(_bytes_to_text(s) for s in enwik8_splits(read_enwik8_bytes(p))))


class PydocTextDataModule(CharStreamDataModule):
    """The ``pydoc_data.topics`` text (about 465k characters), contiguous 90/5/5 split."""

    name = "pydoc text"

    def __init__(self, batch_size: int = 32, seq_len: int = 100, eval_batch_size: int = 16,
                 eval_seq_len: int | None = None, unknown: UnknownPolicy = "unk") -> None:
        super().__init__(batch_size, seq_len, eval_batch_size, eval_seq_len, unknown)

    def read_splits(self) -> _Splits:
        text = pydoc_text()
        return _Splits(*(text[s] for s in contiguous_split(len(text))))

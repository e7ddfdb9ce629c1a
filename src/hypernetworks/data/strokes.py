"""IAM On-Line Handwriting Database (IAM-OnDB) lineStrokes for Graves-style handwriting generation.

Two readers produce the same in-memory layout (:class:`StrokeLines`):

* :func:`load_npz` reads the repacked offline copy (``iam_ondb_linestrokes.npz``: ``strokes`` int16
  ``(N, 3)`` = ``(dx, dy, pen_up)`` with the first row of every line holding absolute ``(x, y)``,
  ``line_offsets``, ``line_ids``, ``texts``);
* :func:`read_xml` reads the original database layout (``lineStrokes/**/*.xml`` and
  ``ascii/**/*.txt``) for users who have the database from its owners.

Graves' preprocessing (:func:`prepare_line`, :func:`offset_stats`, :class:`IAMOnDBLines`): pen offsets,
outlier clipping, normalisation with statistics from the training split only, +-10% random scaling
augmentation on the training split only. :func:`split_of` holds out whole forms deterministically
(a hash of the form id such as ``a01-000u``), so no writer's page is on both sides of a split.
Malformed lines are collected in ``StrokeLines.malformed`` (id -> reason), reported, and never silently
dropped: callers see the count, and ``strict=True`` turns them into an error.

IAM-OnDB is for non-commercial research use (registration with FKI, University of Bern); never
redistribute it or commit it to this repository.
"""
from __future__ import annotations

import hashlib
import logging
import re
import xml.etree.ElementTree as ET
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from hypernetworks.data.root import dataset_dir, require_files

log = logging.getLogger(__name__)

NPZ_NAME = "iam_ondb_linestrokes.npz"  # the repacked file, in <data folder>/iam_ondb/ by default
REQUIRED_KEYS = ("strokes", "line_offsets", "line_ids", "texts")
SPLITS = ("train", "val", "test")


class StrokeDataError(ValueError):
    """A stroke file is missing, unreadable or inconsistent (the message names the file)."""


@dataclass
class StrokeLines:
    """Handwritten lines in the npz layout: ``strokes[line_offsets[i]:line_offsets[i+1]]`` is line i.

    Rows are ``(dx, dy, pen_up)``; the first row of a line holds absolute ``(x, y)``, so
    ``np.cumsum(line[:, :2], 0)`` gives the raw whiteboard coordinates back. ``pen_up = 1`` marks the
    last point of each stroke. ``malformed`` maps a line id (or file) to the reason it is unusable.
    """

    strokes: np.ndarray
    line_offsets: np.ndarray
    line_ids: np.ndarray
    texts: np.ndarray
    malformed: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.line_ids)

    def line(self, i: int) -> np.ndarray:
        return self.strokes[self.line_offsets[i] : self.line_offsets[i + 1]]

    def absolute(self, i: int) -> np.ndarray:
        """Line i as absolute ``(x, y, pen_up)`` points (int64)."""
        line = self.line(i).astype(np.int64)
        out = line.copy()
        out[:, :2] = np.cumsum(line[:, :2], axis=0)
        return out

    def form_ids(self) -> list[str]:
        return [form_of(str(i)) for i in self.line_ids]


def form_of(line_id: str) -> str:
    """Form (page) id of a line id: ``a01-000u-01`` -> ``a01-000u``."""
    return line_id.rsplit("-", 1)[0]


def split_of(form: str, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """Deterministic split of a whole form: a stable hash (not Python's salted ``hash``) in [0, 1)."""
    if not (0.0 <= val_fraction and 0.0 <= test_fraction and val_fraction + test_fraction < 1.0):
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: need >= 0 and sum < 1")
    u = int(hashlib.sha1(form.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


# ----------------------------------------------------------------------------------------- readers
def load_npz(path: str | Path, min_points: int = 2) -> StrokeLines:
    """Read and validate the repacked IAM-OnDB file; lines with fewer than ``min_points`` points are
    listed in ``malformed`` (not removed: the datasets exclude them and report the count)."""
    path = Path(path)
    if not path.is_file():
        raise StrokeDataError(
            f"{path}: IAM-OnDB stroke file not found (expected the repacked iam_ondb_linestrokes.npz; "
            "see docs/handwriting.md, or pass xml_root= for the original lineStrokes/ascii layout)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in REQUIRED_KEYS if k not in z.files]
            if missing:
                raise StrokeDataError(f"{path}: missing arrays {missing} (has {sorted(z.files)})")
            arrays = {k: z[k] for k in REQUIRED_KEYS}
    except StrokeDataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, zlib.error) as e:  # damaged or truncated
        raise StrokeDataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    lines = StrokeLines(**arrays, source=str(path))
    validate(lines, where=str(path))
    lines.malformed.update(_short_lines(lines, min_points))
    return lines


def validate(lines: StrokeLines, where: str = "strokes") -> None:
    """Check array shapes/dtypes and offsets; raise :class:`StrokeDataError` naming ``where``."""
    s, o = lines.strokes, lines.line_offsets
    if s.ndim != 2 or s.shape[1] != 3 or not np.issubdtype(s.dtype, np.integer):
        raise StrokeDataError(f"{where}: 'strokes' must be an integer (N, 3) array, got {s.dtype} {s.shape}")
    if o.ndim != 1 or len(o) < 1 or not np.issubdtype(o.dtype, np.integer):
        raise StrokeDataError(f"{where}: 'line_offsets' must be a 1-D integer array, got {o.dtype} {o.shape}")
    if o[0] != 0 or o[-1] != len(s) or np.any(np.diff(o) < 0):
        raise StrokeDataError(
            f"{where}: bad 'line_offsets' (must start at 0, be non-decreasing and end at len(strokes)={len(s)}; "
            f"got first={o[0]}, last={o[-1]}, decreasing steps={int(np.sum(np.diff(o) < 0))})"
        )
    n = len(o) - 1
    for key in ("line_ids", "texts"):
        a = getattr(lines, key)
        if a.ndim != 1 or len(a) != n:
            raise StrokeDataError(f"{where}: '{key}' has shape {a.shape}, expected ({n},) (one per line)")
    if len(s) and not np.isin(s[:, 2], (0, 1)).all():
        raise StrokeDataError(f"{where}: pen_up column of 'strokes' must be 0/1")


def _short_lines(lines: StrokeLines, min_points: int) -> dict[str, str]:
    counts = np.diff(lines.line_offsets)
    return {str(lines.line_ids[i]): f"only {counts[i]} points (< {min_points})" for i in np.flatnonzero(counts < min_points)}


def save_npz(lines: StrokeLines, path: str | Path) -> None:
    """Write ``lines`` in the npz layout (no pickles: strings are fixed-width unicode arrays)."""
    np.savez_compressed(
        path,
        strokes=lines.strokes.astype(np.int16 if np.abs(lines.strokes).max(initial=0) < 2**15 else np.int32),
        line_offsets=lines.line_offsets.astype(np.int64),
        line_ids=np.asarray(lines.line_ids, dtype=str),
        texts=np.asarray(lines.texts, dtype=str),
    )


def _read_csr(txt: Path) -> list[str]:
    """Transcription lines of a form: the lines after ``CSR:`` in ``ascii/**/<form>.txt``."""
    text = txt.read_text(encoding="latin-1").splitlines()
    try:
        start = next(i for i, t in enumerate(text) if t.strip() == "CSR:")
    except StopIteration:
        raise StrokeDataError(f"{txt}: no 'CSR:' section") from None
    return [t.strip() for t in text[start + 1 :] if t.strip()]


def _read_line_xml(path: Path) -> np.ndarray:
    """One lineStrokes XML file -> (n, 3) int64 array of absolute x, y, pen_up."""
    root = ET.parse(path).getroot()
    strokes = root.findall(".//StrokeSet/Stroke")
    if not strokes:
        raise ValueError("no <Stroke> elements")
    rows: list[tuple[int, int, int]] = []
    for k, stroke in enumerate(strokes):
        pts = stroke.findall("Point")
        if not pts:
            raise ValueError(f"stroke {k} has no <Point>")
        for j, p in enumerate(pts):
            try:
                x, y = int(float(p.attrib["x"])), int(float(p.attrib["y"]))
            except (KeyError, ValueError) as e:
                raise ValueError(f"stroke {k} point {j}: bad or missing x/y ({e})") from None
            rows.append((x, y, int(j == len(pts) - 1)))
    return np.asarray(rows, dtype=np.int64)


def read_xml(root: str | Path, strict: bool = False, min_points: int = 2) -> StrokeLines:
    """Read the original layout ``root/lineStrokes/**/*.xml`` (+ ``root/ascii/**/*.txt``).

    Unreadable or empty XML files are recorded in ``malformed`` with the reason (``strict=True``
    raises instead); lines without a transcription get ``""`` (generation does not need text).
    """
    root = Path(root)
    xml_dir = root / "lineStrokes"
    if not xml_dir.is_dir():
        raise StrokeDataError(f"{xml_dir}: lineStrokes directory not found")
    files = sorted(xml_dir.rglob("*.xml"))
    if not files:
        raise StrokeDataError(f"{xml_dir}: no .xml files")
    transcripts: dict[str, list[str]] = {}
    for txt in sorted((root / "ascii").rglob("*.txt")) if (root / "ascii").is_dir() else []:
        try:
            transcripts[txt.stem] = _read_csr(txt)
        except StrokeDataError:
            if strict:
                raise
            log.warning("%s: no CSR section; its lines get empty transcriptions", txt)

    chunks, ids, texts, malformed = [], [], [], {}
    for f in files:
        line_id = f.stem
        try:
            pts = _read_line_xml(f)
        except (ET.ParseError, ValueError) as e:
            if strict:
                raise StrokeDataError(f"{f}: malformed lineStrokes file ({e})") from e
            malformed[str(f)] = str(e)
            continue
        offsets = pts.copy()
        offsets[1:, :2] = np.diff(pts[:, :2], axis=0)
        chunks.append(offsets)
        ids.append(line_id)
        m = re.search(r"-(\d+)$", line_id)
        csr = transcripts.get(form_of(line_id), [])
        idx = int(m.group(1)) - 1 if m else -1
        texts.append(csr[idx] if 0 <= idx < len(csr) else "")
    if not chunks:
        raise StrokeDataError(f"{xml_dir}: none of {len(files)} XML files could be read ({malformed})")
    if malformed:
        log.warning("%s: %d malformed lineStrokes file(s) not read: %s", xml_dir, len(malformed), malformed)
    untranscribed = sum(1 for t in texts if not t)
    if untranscribed:  # harmless for unconditional generation, but say so
        log.warning("%s: %d of %d lines have no transcription in ascii/", root, untranscribed, len(texts))
    strokes = np.concatenate(chunks)
    lines = StrokeLines(
        strokes=strokes,
        line_offsets=np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64),
        line_ids=np.asarray(ids, dtype=str),
        texts=np.asarray(texts, dtype=str),
        malformed=malformed,
        source=str(root),
    )
    validate(lines, where=str(root))
    lines.malformed.update(_short_lines(lines, min_points))
    return lines


# ----------------------------------------------------------------------------------- preprocessing
def prepare_line(line: np.ndarray, clip: float | None = 1000.0) -> np.ndarray:
    """Raw npz-layout line -> float32 ``(dx, dy, pen_up)`` pen offsets.

    The absolute start is replaced by a zero offset (a line's page position carries no shape), and
    offsets beyond +-``clip`` raw units (the rare huge pen jumps) are clipped, as in Graves' setup.
    """
    out = line.astype(np.float32, copy=True)
    out[0, :2] = 0.0
    if clip is not None:
        np.clip(out[:, :2], -clip, clip, out=out[:, :2])
    return out


def offset_stats(lines: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of (dx, dy) over prepared lines (excluding each line's zero start row)."""
    xy = np.concatenate([x[1:, :2] for x in lines]).astype(np.float64)
    if len(xy) == 0:
        raise ValueError("offset_stats: no offsets (all lines have one point)")
    std = xy.std(0)
    return xy.mean(0).astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


class IAMOnDBLines(Dataset):
    """Normalised pen-offset sequences of some lines: item i is a float32 tensor ``(T, 3)``.

    Args:
        lines: prepared lines (:func:`prepare_line`).
        mean, std: normalisation statistics (from the training split).
        scale_augment: draw an independent factor in ``[1 - s, 1 + s]`` per axis and per item
            (training only; uses torch's global RNG, so ``seed_everything`` fixes it).
        max_len: keep only the first ``max_len + 1`` points (``max_len`` prediction steps).
    """

    def __init__(self, lines: Sequence[np.ndarray], mean, std, scale_augment: float = 0.0, max_len: int | None = None):
        if scale_augment < 0 or scale_augment >= 1:
            raise ValueError(f"scale_augment must be in [0, 1), got {scale_augment}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.lines = [x if max_len is None else x[: max_len + 1] for x in lines]
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.scale_augment = scale_augment

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(self.lines[i]).clone()
        if self.scale_augment:
            factor = 1.0 + self.scale_augment * (2 * torch.rand(2) - 1)
            x[:, :2] *= factor
        x[:, :2] = (x[:, :2] - self.mean) / self.std
        x[0, :2] = 0.0  # the start row is a fixed "begin" token, not a real offset
        return x


def collate_strokes(batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pad a list of ``(T_i, 3)`` sequences; inputs are steps ``0..T-2``, targets steps ``1..T-1``."""
    lengths = torch.tensor([len(x) - 1 for x in batch])
    if (lengths < 1).any():
        raise ValueError("collate_strokes: every sequence needs at least 2 points")
    padded = pad_sequence(batch, batch_first=True)
    mask = torch.arange(padded.shape[1] - 1)[None, :] < lengths[:, None]
    return {"inputs": padded[:, :-1], "targets": padded[:, 1:], "mask": mask, "lengths": lengths}


class IAMOnDBDataModule(LightningDataModule):
    """IAM-OnDB lines for unconditional handwriting generation (Graves 2013, section 4).

    Args:
        path: the repacked ``.npz`` (ignored when ``xml_root`` is given); default
            ``<data folder>/iam_ondb/iam_ondb_linestrokes.npz`` (see hypernetworks.data.root).
        xml_root: a folder with the original ``lineStrokes/`` and ``ascii/`` trees.
        batch_size: sequences per batch (the paper: 32).
        val_fraction, test_fraction: share of *forms* held out (see :func:`split_of`).
        clip: clip raw pen offsets to +-clip (whiteboard units).
        scale_augment: +-fraction random scaling of training lines (the paper: 0.1).
        max_lines: use at most this many training lines (evenly spaced over the split; CPU recipes).
        max_val_lines: same for validation and test.
        max_len: truncate every line to its first ``max_len`` prediction steps (CPU recipes).
        min_points: lines with fewer points are malformed (counted and reported, not used).
        strict: raise on any malformed line instead of reporting it.
    """

    def __init__(
        self,
        path: str | None = None,
        xml_root: str | None = None,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        clip: float | None = 1000.0,
        scale_augment: float = 0.1,
        max_lines: int | None = None,
        max_val_lines: int | None = None,
        max_len: int | None = None,
        min_points: int = 2,
        strict: bool = False,
        num_workers: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        split_of("x", val_fraction, test_fraction)  # validates the fractions early
        for name, v in (("max_lines", max_lines), ("max_val_lines", max_val_lines)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.save_hyperparameters()
        self._path_given = path is not None
        self.path = path if path is not None else str(dataset_dir("iam_ondb") / NPZ_NAME)
        self.xml_root = xml_root
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.clip, self.scale_augment, self.max_len = clip, scale_augment, max_len
        self.max_lines, self.max_val_lines = max_lines, max_val_lines
        self.min_points, self.strict = min_points, strict
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.report: dict[str, object] = {}
        self._splits: dict[str, list[np.ndarray]] = {}

    @property
    def stats(self) -> dict[str, list[float]]:
        """Training-split normalisation statistics (needed to turn samples back into pen units)."""
        if self.mean is None:
            self.setup()
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def check_data(self) -> None:
        """Raise DataNotFoundError (one paragraph: which file, where, what to do) if the data is missing."""
        if self.xml_root:
            root = Path(self.xml_root).expanduser()
            require_files("iam_ondb", [[root / "lineStrokes"]], explicit=True, option="xml_root")
        else:
            require_files("iam_ondb", [[Path(self.path).expanduser()]], explicit=self._path_given, option="path")

    def prepare_data(self) -> None:
        self.check_data()

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        if self.xml_root:
            lines = read_xml(self.xml_root, strict=self.strict, min_points=self.min_points)
        else:
            lines = load_npz(self.path, min_points=self.min_points)
        if self.strict and lines.malformed:
            raise StrokeDataError(f"{lines.source}: {len(lines.malformed)} malformed lines: {lines.malformed}")
        by_split: dict[str, list[int]] = {s: [] for s in SPLITS}
        for i, line_id in enumerate(lines.line_ids):
            if str(line_id) not in lines.malformed:
                by_split[split_of(form_of(str(line_id)), self.val_fraction, self.test_fraction)].append(i)
        caps = {"train": self.max_lines, "val": self.max_val_lines, "test": self.max_val_lines}
        for s in SPLITS:
            idx = by_split[s]
            if caps[s] is not None and len(idx) > caps[s]:  # evenly spaced: covers many writers
                idx = [idx[k] for k in np.linspace(0, len(idx) - 1, caps[s]).round().astype(int)]
            self._splits[s] = [prepare_line(lines.line(i), self.clip) for i in idx]
        if not self._splits["train"]:
            raise StrokeDataError(f"{lines.source}: no usable training lines")
        self.mean, self.std = offset_stats(self._splits["train"])
        self.report = {
            "source": lines.source,
            "lines": len(lines),
            "malformed": len(lines.malformed),
            **{f"{s}_lines": len(v) for s, v in self._splits.items()},
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }
        msg = f"IAM-OnDB {self.report}"
        if lines.malformed:
            shown = dict(list(lines.malformed.items())[:5])
            msg += f"; {len(lines.malformed)} malformed lines not used, e.g. {shown}"
        log.info(msg)
        print(msg)

    def dataset(self, split: str) -> IAMOnDBLines:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        aug = self.scale_augment if split == "train" else 0.0
        return IAMOnDBLines(self._splits[split], self.mean, self.std, scale_augment=aug, max_len=self.max_len)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=collate_strokes,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

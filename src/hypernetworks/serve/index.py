"""The checkpoint index: which files the demo serves, under which ids, and what each one draws.

Safety rules, all in this module:

* Only regular files are read. A FIFO, socket or device named ``*.ckpt`` is skipped without being
  opened (opening a FIFO blocks until someone writes to it), and a file is opened non-blocking and
  checked again on the open descriptor, so one swapped for a FIFO between the two checks is still
  never waited on.
* No file I/O happens while the index lock is held. A rescan stats and reads files with no lock
  held and then swaps the new listing in under the lock; requests meanwhile answer from the
  listing they have. Only one thread rescans at a time; the others wait for it at most
  ``scan_wait`` seconds and then use the previous listing.
* Files are read once per version: what a file's header says (its task class, or that it could
  not be read) is remembered by (path, size, modification time), so an unreadable or hostile
  file costs one read, not one per request.
* Reading the header is bounded: the zip directory is checked (members stored uncompressed, as
  ``torch.save`` writes them, and a pickle of at most :data:`MAX_HEADER_BYTES`) before the pickle
  is read with ``torch.load(weights_only=True, mmap=True)``, which maps the tensors without
  reading them.
"""
from __future__ import annotations

import collections
import importlib
import logging
import os
import stat
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("hypernetworks.serve")

MAX_HEADER_BYTES = 16 << 20  # a checkpoint's pickle (hyper-parameters, tensor references): a few KiB
MAX_ARCHIVE_MEMBERS = 200_000
SCAN_WAIT_S = 5.0

# What a file looked like when it was read: (size, st_mtime_ns).
Stamp = tuple[int, int]


@dataclass
class CheckpointEntry:
    id: str
    path: Path
    kind: str  # "text", "strokes" or "unknown" until a first generation tells


def _kind_from_class_path(class_path: str) -> str:
    name = class_path.lower()
    if "handwriting" in name:
        return "strokes"
    if "language_model" in name or "char" in name:
        return "text"
    return "unknown"


def regular_file_stamp(path: Path) -> Stamp | None:
    """(size, mtime_ns) of a regular file (symlinks followed); None for anything else or nothing."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def open_regular(path: Path) -> tuple[int, Stamp]:
    """Open ``path`` for reading without blocking on a FIFO or device, and check on the open
    descriptor that it is a regular file; returns (fd, (size, mtime_ns)). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path.name} is not a regular file")
        if hasattr(os, "O_NONBLOCK"):  # reads of a regular file never block; leave it as any other file
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, (st.st_size, st.st_mtime_ns)


def _check_header(fd: int) -> None:
    """The zip directory of a ``torch.save`` archive, read from ``fd`` without unpacking anything:
    refuses compressed members, too many members and an oversized pickle (ValueError)."""
    with os.fdopen(os.dup(fd), "rb") as f, zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise ValueError(f"{len(infos)} archive members")
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"compressed member {info.filename!r}")
            if info.filename.endswith("data.pkl") and info.file_size > MAX_HEADER_BYTES:
                raise ValueError(f"{info.file_size} bytes of pickle")


def _stored_class_path(path: Path) -> str | None:
    """The task class a checkpoint records, read without running code (None if unreadable, or
    not a regular file)."""
    try:
        fd, _ = open_regular(path)
    except OSError:
        return None
    try:
        _check_header(fd)
        import torch

        # On Linux, load through the descriptor already checked (the same file even if the path
        # is replaced meanwhile). weights_only: no pickled code runs; mmap: tensors are mapped,
        # not read, so only the small pickle is read from disk.
        proc = f"/proc/self/fd/{fd}"
        ckpt = torch.load(proc if os.path.exists(proc) else path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable file is reported when it is first used, not at listing
        return None
    finally:
        os.close(fd)
    if not isinstance(ckpt, dict):
        return None
    hparams = ckpt.get("hyper_parameters") or {}
    # LightningCLI's "_class_path", or the key the project's training callbacks add.
    class_path = hparams.get("_class_path") if isinstance(hparams, dict) else None
    class_path = class_path or ckpt.get("hypernetworks_task_class_path")
    return str(class_path) if class_path else None


def _has_demo(class_path: str | None) -> bool | None:
    """Whether the package's task class has ``demo_stream``; None when that cannot be told without
    importing code from outside the package."""
    if not class_path or not class_path.startswith("hypernetworks."):
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except Exception:
        return None
    return callable(getattr(cls, "demo_stream", None))


def checkpoint_kind(path: Path) -> str:
    """Guess what a checkpoint draws ("text", "strokes", "unknown") from its stored task class."""
    return _kind_from_class_path(_stored_class_path(path) or "")


@dataclass
class _Listing:
    """One scan's result; replaced whole, never changed in place (so it can be read without a lock)."""

    stamps: dict[Path, int | None] = field(default_factory=dict)  # folder or named file -> st_mtime_ns
    headers: dict[Path, tuple[Stamp, str | None]] = field(default_factory=dict)  # file -> (stamp, class path)
    entries: dict[str, CheckpointEntry] = field(default_factory=dict)


class CheckpointIndex:
    """The servable checkpoints under some files and folders, kept current cheaply.

    Each ``entries()`` call stats the folders seen at the last scan (and the named files); only
    when a folder's modification time changed (a file or sub-folder added, removed or renamed
    into place) is the tree walked again, and only new or rewritten files are opened to read
    their task class. Ids are paths relative to the folder given (or the file name for a file
    given by name), so they stay stable across rescans and reveal nothing above that folder.
    See the module's docstring for the rules on what is read and when.
    """

    def __init__(self, sources: list[str | Path], *, scan_wait: float = SCAN_WAIT_S):
        if not sources:
            raise ValueError("checkpoints: need at least one checkpoint file or directory")
        self.sources = [Path(s).expanduser() for s in sources]
        for p in self.sources:
            if not p.exists():
                raise ValueError(f"checkpoints: no such file or directory: {p}")
            if p.is_dir() and not any(p.rglob("*.ckpt")):
                raise ValueError(f"checkpoints: no *.ckpt files under directory {p}")
        self.scan_wait = scan_wait
        self._listing = _Listing()
        self._lock = threading.Lock()  # guards the swap of self._listing: never held during I/O
        self._scan_lock = threading.Lock()  # one rescan at a time (held during I/O; waited on briefly)
        self.scans = 0  # full walks so far (tests check that unchanged folders are not walked)
        self.header_reads = 0  # files opened to read their task class (tests check they are remembered)
        self.entries()
        if not self._listing.entries:
            raise ValueError(f"checkpoints: none of {', '.join(map(str, sources))} holds a text or handwriting model")

    @staticmethod
    def _mtime(path: Path) -> int | None:
        try:
            return path.stat().st_mtime_ns
        except (OSError, ValueError):
            return None

    def current(self) -> dict[str, CheckpointEntry]:
        """The listing as of the last scan, without looking at the disk."""
        with self._lock:
            return self._listing.entries

    def _changed(self, listing: _Listing) -> bool:
        if not listing.stamps:
            return True
        return any(self._mtime(p) != stamp for p, stamp in listing.stamps.items())

    def entries(self) -> dict[str, CheckpointEntry]:
        with self._lock:
            listing = self._listing
        if not self._changed(listing):  # a few stats, no lock held
            return listing.entries
        if not self._scan_lock.acquire(timeout=self.scan_wait):
            log.warning("checkpoint rescan still running after %.0f s; answering from the last listing", self.scan_wait)
            return self.current()
        try:
            with self._lock:
                latest = self._listing
            if latest is not listing and not self._changed(latest):  # another thread just rescanned
                return latest.entries
            new = self._scan(latest)  # file I/O, with only the scan lock held
            with self._lock:
                self._listing = new
            return new.entries
        finally:
            self._scan_lock.release()

    def get(self, ckpt_id: str) -> CheckpointEntry | None:
        return self.entries().get(ckpt_id)

    def _scan(self, old: _Listing) -> _Listing:
        self.scans += 1
        stamps: dict[Path, int | None] = {}
        found: list[tuple[str, Path, bool]] = []
        for src in self.sources:
            stamps[src] = self._mtime(src)
            if src.is_dir():
                for folder, dirs, files in os.walk(src):
                    dirs.sort()
                    stamps[Path(folder)] = self._mtime(Path(folder))
                    for name in sorted(files):
                        if name.endswith(".ckpt"):
                            f = Path(folder, name)
                            found.append((f.relative_to(src).as_posix(), f, False))
            else:
                found.append((src.name, src, True))
        entries: dict[str, CheckpointEntry] = {}
        seen: set[Path] = set()
        used: collections.Counter[str] = collections.Counter()
        headers: dict[Path, tuple[Stamp, str | None]] = {}
        for name, path, explicit in found:
            resolved = path.resolve()
            file_stamp = regular_file_stamp(resolved)
            if resolved in seen or file_stamp is None:  # gone, or a FIFO, socket, device, folder
                if file_stamp is None and resolved.exists():
                    log.info("skipping %s: not a regular file", path)
                continue
            seen.add(resolved)
            cached = old.headers.get(resolved)
            if cached is not None and cached[0] == file_stamp:
                class_path = cached[1]
            else:
                self.header_reads += 1
                class_path = _stored_class_path(resolved)
            headers[resolved] = (file_stamp, class_path)
            if not explicit and _has_demo(class_path) is False:
                log.info("skipping %s: %s has no demo_stream", path, class_path)
                continue
            used[name] += 1
            ident = name if used[name] == 1 else f"{name} ({used[name]})"
            previous = old.entries.get(ident)
            kind = _kind_from_class_path(class_path or "")
            if kind == "unknown" and previous is not None and previous.path == resolved:
                kind = previous.kind  # learnt from a generation
            entries[ident] = CheckpointEntry(ident, resolved, kind)
        return _Listing(stamps, headers, entries)


def find_checkpoints(paths: list[str | Path]) -> list[CheckpointEntry]:
    """Expand files and directories (searched recursively for *.ckpt) into uniquely named entries.

    Checkpoints found in a directory whose task has no ``demo_stream`` (an image classifier, say)
    are left out; files named explicitly are always listed.
    """
    return list(CheckpointIndex(paths).entries().values())

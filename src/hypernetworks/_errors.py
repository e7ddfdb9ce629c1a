"""Errors that end a command with one paragraph instead of a traceback.

A damaged or refused checkpoint, a damaged data file, missing data, a full disk and bad saved
settings are the user's input, not the program's bug: the commands print :func:`user_message`
and exit non-zero. ``HYPERNETWORKS_DEBUG=1`` re-raises them with the traceback.
"""
from __future__ import annotations

import errno
import os
import textwrap


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full(exc: BaseException) -> OSError | None:
    """The ``ENOSPC`` error in ``exc``'s chain (torch.save buries it under an inline_container error)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
    return None


def user_message(exc: BaseException) -> str | None:
    """One line for an error caused by the user's files, disk or settings; ``None`` for anything else."""
    from hypernetworks.checkpoints import CheckpointError
    from hypernetworks.data.images import DatasetFileError
    from hypernetworks.data.root import DataNotFoundError

    full = disk_full(exc)
    if full is not None:
        where = full.filename or getattr(exc, "filename", None)
        return f"no space left on device{f' while writing {where}' if where else ''}: free some space and rerun"
    if isinstance(exc, (CheckpointError, DatasetFileError, DataNotFoundError)):
        return " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"file not found: {exc.filename}"
    if isinstance(exc, ValueError):  # the project raises ValueError for bad input: settings, files, shapes
        return " ".join(str(exc).split()) + " (HYPERNETWORKS_DEBUG=1 shows the traceback)"
    return None


def debug() -> bool:
    return os.environ.get("HYPERNETWORKS_DEBUG", "") not in ("", "0")


def paragraph(prog: str, message: str) -> str:
    return textwrap.fill(f"{prog}: {message}", width=100, break_long_words=False, break_on_hyphens=False)

"""Generations: loading a checkpoint's task (cached), the bounded queue of requests, and the steps
streamed as events.

Safety rules, all in this module:

* At most ``workers`` generations run and at most ``queue`` more wait; beyond that a request is
  refused at once (503 + Retry-After), never left hanging (:class:`GenerationQueue`).
* A checkpoint that cannot be loaded, or is not a text or handwriting model, is remembered by
  (path, size, modification time): later requests for the same file version get the same error at
  once, without reading the file again (:meth:`DemoApp.task`). Loads of different files do not
  wait for each other; two requests for the same new file load it once.
* Whatever ends a request (the end, an error, the client leaving) gives back its worker slot and
  closes the task's step iterator (:meth:`DemoApp.finish`, run by the request's dependency).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import anyio

from hypernetworks.serve.errors import RequestError, scrub, shown
from hypernetworks.serve.index import CheckpointEntry, CheckpointIndex, Stamp, open_regular, regular_file_stamp

log = logging.getLogger("hypernetworks.serve")

MAX_PRIME_CHARS = 1000
TEMPERATURE_RANGE = (0.01, 10.0)
SEED_RANGE = (0, 2**31 - 1)
KINDS = ("text", "strokes")


def _finite(x: Any) -> Any:
    """NaN/inf (invalid JSON) as None, recursively: a diverged model should still be viewable."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if hasattr(x, "tolist"):  # numpy / torch values inside a result
        return _finite(x.tolist())
    return x


def _default_loader(path: Path):
    from hypernetworks.training import load_task

    return load_task(path, map_location="cpu")


class GenerationQueue:
    """At most ``workers`` generations run at once and at most ``queue`` more wait; a request
    beyond that is refused at once (503 + Retry-After) rather than left hanging. Used from the
    event loop only, so the counters need no lock."""

    def __init__(self, workers: int, queue: int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if queue < 0:
            raise ValueError(f"queue must be >= 0, got {queue}")
        self.workers, self.queue = workers, queue
        self.admitted = 0  # running + waiting
        self.running = 0
        self._slots = asyncio.Semaphore(workers)
        self._mean_seconds = 1.0  # running mean of generation time, for Retry-After

    def admit(self) -> None:
        if self.admitted >= self.workers + self.queue:
            # Roughly when a slot frees: the queue ahead, at the mean generation time.
            wait = self._mean_seconds * (self.admitted - self.workers + 1) / self.workers
            retry = str(max(1, min(60, math.ceil(wait))))
            raise RequestError(503, f"the server is busy ({self.running} generating, {self.admitted - self.running} "
                               f"waiting); try again in {retry} s", {"Retry-After": retry})
        self.admitted += 1

    def leave(self) -> None:
        self.admitted -= 1

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    async def acquire(self, ticket: "Ticket") -> None:
        """Wait for a worker slot for this admitted request."""
        await self._slots.acquire()
        ticket.running_since = time.monotonic()
        self.running += 1

    def release(self, ticket: "Ticket") -> None:
        """Give back the ticket's slot, if it holds one (safe to call more than once)."""
        if ticket.running_since is None:
            return
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - ticket.running_since)
        ticket.running_since = None
        self.running -= 1
        self._slots.release()


@dataclass
class Ticket:
    """One admitted generate request: its worker slot and the task's step iterator, released by
    the request's dependency when the response is over. That runs whatever ended it; the async
    generators that stream the events are not reliably closed when a client leaves (they are left
    suspended at a ``yield``), so they must not be the only ones to hold resources."""

    running_since: float | None = None
    items: Iterator | None = None
    busy: Any = None  # threading.Lock held while a worker thread computes a chunk


def _take(items: Iterator, flush_interval: float, max_steps: int) -> list:
    """The next steps of a stream: at least one, then more until ``flush_interval`` seconds have
    passed (so the page gets about 1 / flush_interval updates a second however fast the model)."""
    out = []
    start = time.monotonic()
    for item in items:
        out.append(item)
        if len(out) >= max_steps or time.monotonic() - start >= flush_interval:
            break
    return out


def _close_later(items: Iterator, busy: threading.Lock) -> None:
    """Close a task's step generator (so it restores the model's mode) once no thread runs it: a
    client that leaves cancels the request while a worker thread may still be computing a chunk."""
    close = getattr(items, "close", None)
    if close is None:
        return

    def close_when_idle():
        with busy:
            close()

    if busy.acquire(blocking=False):
        try:
            close()
        finally:
            busy.release()
    else:
        threading.Thread(target=close_when_idle, daemon=True).start()


class DemoApp:
    """The checkpoint index, a small cache of loaded tasks, and the generation queue."""

    def __init__(self, index: CheckpointIndex, *, loader: Callable[[Path], Any] | None = None,
                 max_length: int = 2000, cache_size: int = 4, workers: int = 1, queue: int = 8,
                 flush_interval: float = 0.03):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        if flush_interval < 0:
            raise ValueError(f"flush_interval must be >= 0, got {flush_interval}")
        self.index = index
        self.loader = loader or _default_loader
        self.max_length = max_length
        self.cache_size = cache_size
        self.flush_interval = flush_interval
        self.queue = GenerationQueue(workers, queue)
        # id -> (path, stamp, task): a checkpoint rewritten by a training run is loaded again.
        self._cache: collections.OrderedDict[str, tuple[Path, Stamp, Any]] = collections.OrderedDict()
        # path -> (stamp, status, message): file versions that were refused, answered without reading them again.
        self._refused: collections.OrderedDict[Path, tuple[Stamp, int, str]] = collections.OrderedDict()
        self._cache_lock = threading.Lock()  # guards the two dicts above; never held while loading
        self._loading: dict[Path, threading.Lock] = {}  # one load at a time per file
        self.loads = 0  # loader calls (tests check that refused files are not read again)

    def list_checkpoints(self) -> dict:
        return {
            "checkpoints": [{"id": c.id, "name": c.id, "kind": c.kind} for c in self.index.entries().values()],
            "limits": {
                "length": [1, self.max_length],
                "temperature": list(TEMPERATURE_RANGE),
                "seed": list(SEED_RANGE),
                "prime_chars": MAX_PRIME_CHARS,
            },
        }

    def entry(self, ckpt_id: str) -> CheckpointEntry:
        """The entry for an id, checked before the request takes a queue place: an unknown id is a
        404, and a file version already refused gets its error again at once (one stat, no read)."""
        entry = self.index.get(ckpt_id)
        if entry is None:
            raise RequestError(404, f"unknown checkpoint {shown(ckpt_id)} (GET /api/checkpoints lists them)")
        stamp = regular_file_stamp(entry.path)
        with self._cache_lock:
            refused = self._refused.get(entry.path)
        if refused is not None and refused[0] == stamp:
            raise RequestError(refused[1], refused[2])
        return entry

    def _known(self, entry: CheckpointEntry, stamp: Stamp) -> Any:
        """The cached task for this file version, or the remembered error; None if neither."""
        with self._cache_lock:
            refused = self._refused.get(entry.path)
            if refused is not None and refused[0] == stamp:
                raise RequestError(refused[1], refused[2])
            cached = self._cache.get(entry.id)
            if cached is not None and cached[:2] == (entry.path, stamp):
                self._cache.move_to_end(entry.id)
                return cached[2]
        return None

    def _refuse(self, entry: CheckpointEntry, stamp: Stamp, error: RequestError) -> RequestError:
        with self._cache_lock:
            self._refused[entry.path] = (stamp, error.status, error.message)
            while len(self._refused) > 256:
                self._refused.popitem(last=False)
        return error

    def task(self, entry: CheckpointEntry):
        """The loaded task for a checkpoint (LRU cache); runs in a worker thread."""
        try:  # not a blocking open: a FIFO put in the file's place is refused, never waited on
            fd, stamp = open_regular(entry.path)
            os.close(fd)
        except FileNotFoundError:
            raise RequestError(404, f"checkpoint {entry.id!r} no longer exists") from None
        except OSError:
            raise RequestError(404, f"checkpoint {entry.id!r} is no longer a readable regular file") from None
        task = self._known(entry, stamp)
        if task is not None:
            return task
        with self._cache_lock:
            loading = self._loading.setdefault(entry.path, threading.Lock())
        with loading:  # a second request for the same new file waits for the first one's load
            task = self._known(entry, stamp)
            if task is not None:
                return task
            self.loads += 1
            try:
                task = self.loader(entry.path)
            except Exception as e:
                log.warning("loading %s failed: %s: %s", entry.path, type(e).__name__, e)
                raise self._refuse(entry, stamp, RequestError(
                    500, f"could not load checkpoint {entry.id!r}: {type(e).__name__}: {scrub(str(e), self.index)}")) from None
            if not callable(getattr(task, "demo_stream", None)) or getattr(task, "demo_kind", None) not in KINDS:
                raise self._refuse(entry, stamp, RequestError(
                    400, f"checkpoint {entry.id!r} ({type(task).__name__}) has no demo_stream: "
                    "not a text or handwriting model"))
            if hasattr(task, "eval"):
                task.eval()
            with self._cache_lock:
                self._refused.pop(entry.path, None)
                self._cache[entry.id] = (entry.path, stamp, task)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        entry.kind = task.demo_kind
        return task

    def _open_stream(self, task, entry: CheckpointEntry, args: dict) -> Iterator:
        try:
            return iter(task.demo_stream(**args))
        except ValueError as e:  # the task's own check of its arguments (prime outside the vocabulary, ...)
            raise RequestError(400, scrub(str(e), self.index)) from None

    def _next_chunk(self, items: Iterator, entry: CheckpointEntry, busy: threading.Lock) -> list:
        try:
            with busy:
                return _take(items, self.flush_interval, self.max_length)
        except ValueError as e:
            raise RequestError(400, scrub(str(e), self.index)) from None
        except Exception as e:
            log.exception("generation failed for %s", entry.path)
            raise RequestError(500, f"generation failed: {type(e).__name__}: {scrub(str(e), self.index)}") from None

    def finish(self, ticket: Ticket) -> None:
        """Free what a request holds: its worker slot and the task's step iterator."""
        if ticket.items is not None:
            _close_later(ticket.items, ticket.busy)
            ticket.items = None
        self.queue.release(ticket)

    async def events(self, entry: CheckpointEntry, args: dict, ticket: Ticket) -> Any:
        """The generation as events, each computed just before it is sent: ``("queued", ...)``
        while waiting, then ``start``, ``steps`` (each with the next steps the model made since
        the last one), ``end``. ``ticket`` is the request's admission to the queue."""
        q = self.queue
        if q.running >= q.workers:
            yield "queued", {"ahead": q.waiting - 1, "running": q.running}
        await q.acquire(ticket)
        try:
            t0 = time.monotonic()
            task = await anyio.to_thread.run_sync(self.task, entry)
            ticket.items = await anyio.to_thread.run_sync(self._open_stream, task, entry, args)
            ticket.busy = threading.Lock()  # held by the thread computing a chunk
            yield "start", {"checkpoint": entry.id, "kind": task.demo_kind, "length": args["length"]}
            t = 0
            while True:
                chunk = await anyio.to_thread.run_sync(self._next_chunk, ticket.items, entry, ticket.busy)
                if not chunk:
                    break
                steps, intensity = zip(*chunk)
                yield "steps", {"t": t, "steps": _finite(list(steps)), "intensity": _finite(list(intensity))}
                t += len(chunk)
            yield "end", {"steps": t, "seconds": round(time.monotonic() - t0, 3)}
        finally:
            self.finish(ticket)

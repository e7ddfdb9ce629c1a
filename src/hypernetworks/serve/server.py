"""``hypernetworks serve``: a local demo page for trained checkpoints.

    hypernetworks serve --checkpoints runs/ my_model.ckpt [--host 127.0.0.1] [--port 8000]

The page (hypernetworks/serve/static) lets a user pick a checkpoint (character model or
handwriting model), press Generate, and watch the sample grow as the model computes it, beside
four traces of the HyperLSTM's hidden-to-gate weight-change intensity (gates i, g, f, o).

A FastAPI app under uvicorn:

    GET  /api/checkpoints      -> {"checkpoints": [{"id", "name", "kind"}], "limits": {...}}
    POST /api/generate/stream  {"checkpoint", "length", "temperature", "seed", "prime"}
                               -> server-sent events: queued?, start, steps..., end (or error)
    POST /api/generate         same body -> the whole sample as one JSON object

Request bodies are validated against a declared pydantic model; every error is a JSON
``{"error": message, "status": code}`` without stack traces or absolute paths. Generations go
through a bounded queue (``--workers`` running, ``--queue`` waiting; beyond that 503 with
Retry-After). Host and Origin headers are checked against localhost names by default
(``--allowed-hosts``, ``--allowed-origins``), which also stops DNS-rebinding pages. It binds
127.0.0.1 by default: there is no authentication.
"""
import argparse
import asyncio
import collections
import importlib
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import anyio
import pydantic_core
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("hypernetworks.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 * 1024
MAX_PRIME_CHARS = 1000
TEMPERATURE_RANGE = (0.01, 10.0)
SEED_RANGE = (0, 2**31 - 1)
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]")
KINDS = ("text", "strokes")


class RequestError(Exception):
    """A client-visible error: a JSON response with this status and message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# ------------------------------------------------------------------------------ checkpoint index
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


def _stored_class_path(path: Path) -> str | None:
    """The task class a checkpoint records, read without running code (None if unreadable)."""
    try:
        import torch

        # weights_only: no pickled code runs; mmap: only the small hparams dict is read from disk.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable file is reported when it is first used, not at listing
        return None
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


class CheckpointIndex:
    """The servable checkpoints under some files and folders, kept current cheaply.

    Each ``entries()`` call stats the folders seen at the last scan (and the named files); only
    when a folder's modification time changed (a file or sub-folder added, removed or renamed
    into place) is the tree walked again, and only new or rewritten files are opened to read
    their task class. Ids are paths relative to the folder given (or the file name for a file
    given by name), so they stay stable across rescans and reveal nothing above that folder.
    """

    def __init__(self, sources: list[str | Path]):
        if not sources:
            raise ValueError("checkpoints: need at least one checkpoint file or directory")
        self.sources = [Path(s).expanduser() for s in sources]
        for p in self.sources:
            if not p.exists():
                raise ValueError(f"checkpoints: no such file or directory: {p}")
            if p.is_dir() and not any(p.rglob("*.ckpt")):
                raise ValueError(f"checkpoints: no *.ckpt files under directory {p}")
        self._stamps: dict[Path, int | None] = {}  # folder or named file -> st_mtime_ns at last scan
        self._class_paths: dict[Path, tuple[int, str | None]] = {}  # file -> (mtime_ns, class path)
        self._entries: dict[str, CheckpointEntry] = {}
        self._lock = threading.Lock()
        self.scans = 0  # full walks so far (tests check that unchanged folders are not walked)
        self.entries()
        if not self._entries:
            raise ValueError(f"checkpoints: none of {', '.join(map(str, sources))} holds a text or handwriting model")

    @staticmethod
    def _mtime(path: Path) -> int | None:
        try:
            return path.stat().st_mtime_ns
        except OSError:
            return None

    def _changed(self) -> bool:
        if not self._stamps:
            return True
        return any(self._mtime(p) != stamp for p, stamp in self._stamps.items())

    def entries(self) -> dict[str, CheckpointEntry]:
        with self._lock:
            if self._changed():
                self._scan()
            return self._entries

    def get(self, ckpt_id: str) -> CheckpointEntry | None:
        return self.entries().get(ckpt_id)

    def _scan(self) -> None:
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
            elif src.is_file():
                found.append((src.name, src, True))
        entries: dict[str, CheckpointEntry] = {}
        seen: set[Path] = set()
        used: collections.Counter[str] = collections.Counter()
        class_paths: dict[Path, tuple[int, str | None]] = {}
        for name, path, explicit in found:
            resolved = path.resolve()
            mtime = self._mtime(resolved)
            if resolved in seen or mtime is None:
                continue
            seen.add(resolved)
            cached = self._class_paths.get(resolved)
            class_path = cached[1] if cached and cached[0] == mtime else _stored_class_path(resolved)
            class_paths[resolved] = (mtime, class_path)
            if not explicit and _has_demo(class_path) is False:
                log.info("skipping %s: %s has no demo_stream", path, class_path)
                continue
            used[name] += 1
            ident = name if used[name] == 1 else f"{name} ({used[name]})"
            old = self._entries.get(ident)
            kind = _kind_from_class_path(class_path or "")
            if kind == "unknown" and old is not None and old.path == resolved:
                kind = old.kind  # learnt from a generation
            entries[ident] = CheckpointEntry(ident, resolved, kind)
        self._stamps, self._class_paths, self._entries = stamps, class_paths, entries


def find_checkpoints(paths: list[str | Path]) -> list[CheckpointEntry]:
    """Expand files and directories (searched recursively for *.ckpt) into uniquely named entries.

    Checkpoints found in a directory whose task has no ``demo_stream`` (an image classifier, say)
    are left out; files named explicitly are always listed.
    """
    return list(CheckpointIndex(paths).entries().values())


# ------------------------------------------------------------------------------ helpers
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:)?[/\\](?:[^\s'\"/\\:]+[/\\])+[^\s'\":,;)]*")


def _scrub(message: str, index: CheckpointIndex | None = None) -> str:
    """A message with absolute paths removed: known checkpoint paths become their ids, served
    folders ``<checkpoints>``, anything else that looks like an absolute path ``<path>``."""
    if index is not None:
        for entry in list(index._entries.values()):
            message = message.replace(str(entry.path), entry.id)
        for src in index.sources:
            for form in {str(src.resolve()), str(src.absolute()), str(src)}:
                if os.path.isabs(form):
                    message = message.replace(form, "<checkpoints>")
    return _ABS_PATH.sub("<path>", message)


def _shown(value: Any) -> str:
    if value == "":
        return "an empty value"
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return type(value).__name__


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


def generate_request_model(max_length: int) -> type[BaseModel]:
    """The declared body of the generate endpoints (its limits depend on ``--max-length``)."""

    class GenerateRequest(BaseModel):
        # strict: "5" is not a length and true is not a seed; unknown fields are mistakes.
        model_config = ConfigDict(extra="forbid", strict=True)
        checkpoint: str = Field(min_length=1, max_length=1000, description="an id from GET /api/checkpoints")
        length: int = Field(min(200, max_length), ge=1, le=max_length, description="steps to generate")
        temperature: float = Field(1.0, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1], allow_inf_nan=False)
        seed: int = Field(0, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="same seed, same sample")
        prime: str = Field("", max_length=MAX_PRIME_CHARS, description="text the model continues (text models)")

    return GenerateRequest


# ------------------------------------------------------------------------------ generation
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
        # id -> (path, mtime_ns, task): a checkpoint rewritten by a training run is loaded again.
        self._cache: collections.OrderedDict[str, tuple[Path, int, Any]] = collections.OrderedDict()
        self._cache_lock = threading.Lock()

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
        entry = self.index.get(ckpt_id)
        if entry is None:
            raise RequestError(404, f"unknown checkpoint {_shown(ckpt_id)} (GET /api/checkpoints lists them)")
        return entry

    def task(self, entry: CheckpointEntry):
        """The loaded task for a checkpoint (LRU cache); runs in a worker thread."""
        try:
            mtime = entry.path.stat().st_mtime_ns
        except OSError:
            raise RequestError(404, f"checkpoint {entry.id!r} no longer exists") from None
        with self._cache_lock:  # one load at a time: two requests for a new file load it once
            cached = self._cache.get(entry.id)
            if cached is not None and cached[:2] == (entry.path, mtime):
                self._cache.move_to_end(entry.id)
                return cached[2]
            try:
                task = self.loader(entry.path)
            except Exception as e:
                log.exception("loading %s failed", entry.path)
                raise RequestError(500, f"could not load checkpoint {entry.id!r}: {type(e).__name__}: "
                                   f"{_scrub(str(e), self.index)}") from None
            if not callable(getattr(task, "demo_stream", None)) or getattr(task, "demo_kind", None) not in KINDS:
                raise RequestError(400, f"checkpoint {entry.id!r} ({type(task).__name__}) has no demo_stream: "
                                   "not a text or handwriting model")
            if hasattr(task, "eval"):
                task.eval()
            self._cache[entry.id] = (entry.path, mtime, task)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        entry.kind = task.demo_kind
        return task

    def _open_stream(self, task, entry: CheckpointEntry, args: dict) -> Iterator:
        try:
            return iter(task.demo_stream(**args))
        except ValueError as e:  # the task's own check of its arguments (prime outside the vocabulary, ...)
            raise RequestError(400, _scrub(str(e), self.index)) from None

    def _next_chunk(self, items: Iterator, entry: CheckpointEntry, busy: threading.Lock) -> list:
        try:
            with busy:
                return _take(items, self.flush_interval, self.max_length)
        except ValueError as e:
            raise RequestError(400, _scrub(str(e), self.index)) from None
        except Exception as e:
            log.exception("generation failed for %s", entry.path)
            raise RequestError(500, f"generation failed: {type(e).__name__}: {_scrub(str(e), self.index)}") from None

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


# ------------------------------------------------------------------------------ web app
class _JSONRequest(Request):
    async def json(self) -> Any:
        # pydantic-core's parser stops at depth 200 with a ValueError, where json.loads would hit
        # a RecursionError (a 500) on a deeply nested body; NaN and Infinity are not JSON.
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body, allow_inf_nan=False)
            except ValueError as e:
                raise json.JSONDecodeError(str(e), body.decode("utf-8", "replace")[:200], 0) from None
        return self._json


class _Route(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route_handler(request: Request):
            return await handler(_JSONRequest(request.scope, request.receive))

        return route_handler


class OriginCheckMiddleware:
    """Refuse (403) a request whose Origin header names another site: a page elsewhere (or on a
    DNS-rebinding name) must not drive the models. Same-origin requests, origins listed in
    ``allowed_origins`` and requests without an Origin (curl, scripts) pass."""

    def __init__(self, app: ASGIApp, allowed_origins: list[str] | None = None):
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins or []}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            origin = headers.get("origin")
            if origin is not None:
                parts = urlsplit(origin.lower())
                same = parts.scheme in ("http", "https") and parts.netloc == headers.get("host", "").lower()
                if not same and origin.rstrip("/").lower() not in self.allowed:
                    response = _error_response(403, f"origin {_shown(origin)} is not allowed "
                                               "(hypernetworks serve --allowed-origins)")
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status,
                        headers={"Cache-Control": "no-store", **(headers or {})})


def _validation_message(errors: list[dict]) -> str:
    parts = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".rstrip(": "))
            continue
        if err.get("type") == "missing" and not loc:
            parts.append("request body must be a JSON object")
            continue
        if err.get("type") == "model_attributes_type" or (not loc and "dict" in err.get("msg", "")):
            parts.append("request body must be a JSON object")
            continue
        msg = err.get("msg", "invalid")
        got = "" if err.get("type") in ("missing", "extra_forbidden") else f", got {_shown(err.get('input'))}"
        parts.append(f"{field or 'body'}: {msg}{got}")
    return "; ".join(parts) or "invalid request"


def make_app(checkpoints: list[str | Path], *, loader: Callable[[Path], Any] | None = None,
             max_length: int = 2000, workers: int = 1, queue: int = 8, flush_interval: float = 0.03,
             allowed_hosts: list[str] | None = None, allowed_origins: list[str] | None = None) -> FastAPI:
    """The demo's ASGI app; ``app.state.demo`` is its :class:`DemoApp`."""
    demo = DemoApp(CheckpointIndex(checkpoints), loader=loader, max_length=max_length, workers=workers,
                   queue=queue, flush_interval=flush_interval)
    GenerateRequest = generate_request_model(max_length)
    app = FastAPI(title="hypernetworks demo", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  max_body_size=MAX_BODY_BYTES)
    app.router.route_class = _Route
    app.state.demo = demo
    app.add_middleware(OriginCheckMiddleware, allowed_origins=allowed_origins)
    # Added last, so it runs first: a request for another host name is refused before anything.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or DEFAULT_ALLOWED_HOSTS),
                       www_redirect=False)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return _error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error_response(422, _validation_message(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return _error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # never a stack trace to the client
        log.exception("internal error")
        return _error_response(500, f"internal error: {type(exc).__name__}")

    async def admitted(body: GenerateRequest):  # type: ignore[valid-type]
        """Checks the checkpoint and takes a place in the queue before the response starts, so a
        full queue is a 503 and an unknown id a 404 (not an error inside a 200 stream)."""
        # In a thread: the index stats folders, and reads new files' headers after a change.
        entry = await anyio.to_thread.run_sync(demo.entry, body.checkpoint)
        demo.queue.admit()
        ticket = Ticket()
        try:
            yield entry, body.model_dump(exclude={"checkpoint"}), ticket
        finally:  # runs when the response is over, however it ended (a client leaving included)
            demo.finish(ticket)
            demo.queue.leave()

    @app.get("/api/checkpoints")
    def list_checkpoints():  # plain def: FastAPI runs it in a thread, off the event loop
        return JSONResponse(demo.list_checkpoints(), headers={"Cache-Control": "no-store"})

    @app.post("/api/generate/stream", response_class=EventSourceResponse)
    async def generate_stream(job=Depends(admitted)):
        entry, args, ticket = job
        try:
            async for event, data in demo.events(entry, args, ticket):
                yield ServerSentEvent(event=event, raw_data=json.dumps(data, allow_nan=False))
        except RequestError as e:  # after the 200: reported as the stream's last event
            yield ServerSentEvent(event="error", raw_data=json.dumps({"error": e.message, "status": e.status}))

    @app.post("/api/generate")
    async def generate(job=Depends(admitted)):
        entry, args, ticket = job
        result: dict[str, Any] = {"steps": [], "intensity": []}
        async for event, data in demo.events(entry, args, ticket):
            if event == "start":
                result.update(kind=data["kind"], checkpoint=data["checkpoint"])
            elif event == "steps":
                result["steps"] += data["steps"]
                result["intensity"] += data["intensity"]
        return JSONResponse(result, headers={"Cache-Control": "no-store"})

    @app.get("/", include_in_schema=False)
    async def index():
        # The page loads nothing from elsewhere; the policy makes the browser enforce that.
        return FileResponse(STATIC_DIR / "index.html", headers={
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ------------------------------------------------------------------------------ server
class DemoServer:
    """uvicorn serving the app on a socket bound at construction (port 0 picks a free port)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
                 limit_concurrency: int = 512):
        self.app = app
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            # Listening from here on: connections made before uvicorn starts wait in the backlog
            # (uvicorn's default 2048, not http.server's 5 that reset bursts) instead of being refused.
            self.socket.listen(2048)
        except OSError:
            self.socket.close()
            raise
        # limit_concurrency: past this many connections uvicorn itself answers 503.
        self.config = uvicorn_config(app, log_level=log_level, limit_concurrency=limit_concurrency)
        self.server = _uvicorn().Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def serve_forever(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self, timeout: float = 30.0) -> "DemoServer":
        """Serve from a background thread (tests, benchmarks); returns once it accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="hypernetworks-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the demo server did not start")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket.close()

    def __enter__(self) -> "DemoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _uvicorn():
    import uvicorn

    return uvicorn


def uvicorn_config(app: FastAPI, **kw):
    return _uvicorn().Config(app, timeout_graceful_shutdown=3, server_header=False, **kw)


def make_server(checkpoints: list[str | Path], host: str = "127.0.0.1", port: int = 8000, **app_kw) -> DemoServer:
    """Build the app and bind its server (not yet serving: ``.start()`` or ``.serve_forever()``)."""
    log_level = app_kw.pop("log_level", "warning")
    return DemoServer(make_app(checkpoints, **app_kw), host, port, log_level=log_level)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hypernetworks serve",
        description="Local demo page: pick a checkpoint, press Generate, watch the text or handwriting "
        "grow step by step beside the HyperLSTM's weight-change traces.",
    )
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="PATH",
                   help="checkpoint files (.ckpt) and/or directories searched recursively for *.ckpt")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; the server has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-length", type=int, default=2000, help="largest generation length a request may ask for")
    p.add_argument("--workers", type=int, default=1, help="generations run at the same time (default 1)")
    p.add_argument("--queue", type=int, default=8,
                   help="generations that may wait for a worker; more get 503 + Retry-After (default 8)")
    p.add_argument("--allowed-hosts", nargs="+", default=list(DEFAULT_ALLOWED_HOSTS), metavar="NAME",
                   help="Host header names accepted (default: localhost 127.0.0.1 [::1]; '*.example.org' "
                   "patterns work); add the name clients use when binding another address")
    p.add_argument("--allowed-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="extra Origins (scheme://host:port) whose pages may call the API; the page's own "
                   "origin is always allowed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, value, low in (("--port", args.port, 0), ("--max-length", args.max_length, 1),
                             ("--workers", args.workers, 1), ("--queue", args.queue, 0)):
        if value < low or (name == "--port" and value > 65535):
            limit = "in 0..65535" if name == "--port" else f">= {low}"
            print(f"hypernetworks serve: {name} must be {limit}, got {value}", file=sys.stderr)
            return 2
    try:
        server = make_server(args.checkpoints, args.host, args.port, max_length=args.max_length,
                             workers=args.workers, queue=args.queue, allowed_hosts=args.allowed_hosts,
                             allowed_origins=args.allowed_origins, log_level="info")
    except (ValueError, AssertionError) as e:  # TrustedHostMiddleware asserts on bad patterns
        print(f"hypernetworks serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"hypernetworks serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can run the models; requests must "
              f"name one of these hosts: {' '.join(args.allowed_hosts)} (--allowed-hosts)", file=sys.stderr)
    for c in server.app.state.demo.index.entries().values():
        print(f"  {c.kind:<8} {c.id}  ({c.path})")
    print(f"serving on {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C
        pass
    finally:
        server.socket.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

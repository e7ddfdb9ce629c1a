"""``hypernetworks serve``: a local demo page for trained checkpoints.

    hypernetworks serve --checkpoints runs/ my_model.ckpt [--host 127.0.0.1] [--port 8000]

The page (hypernetworks/serve/static) lets a user pick a checkpoint (character model or
handwriting model), press Generate, and watch the sample appear step by step beside four
traces of the HyperLSTM's hidden-to-gate weight-change intensity (gates i, g, f, o).

The server is the standard library's ThreadingHTTPServer with a small JSON API:

    GET  /api/checkpoints  -> {"checkpoints": [{"id", "name", "kind"}], "limits": {...}}
    POST /api/generate     {"checkpoint", "length", "temperature", "seed", "prime"}
                           -> the task's ``demo_generate`` dict {"kind", "steps", "intensity"}

Every request is validated; bad input gets a 4xx JSON ``{"error": message}``, never a stack
trace. Checkpoints are loaded with ``hypernetworks.training.load_task`` on first use and cached.
It binds 127.0.0.1 by default: it has no authentication, so only expose it on a trusted network.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import logging
import math
import mimetypes
import sys
import threading
import traceback
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

log = logging.getLogger("hypernetworks.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 * 1024
MAX_PRIME_CHARS = 1000
TEMPERATURE_RANGE = (0.01, 10.0)
SEED_RANGE = (0, 2**31 - 1)
GENERATE_FIELDS = {"checkpoint", "length", "temperature", "seed", "prime"}


class RequestError(Exception):
    """A client error: turned into a JSON response with this status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class CheckpointEntry:
    id: str
    path: Path
    kind: str  # "text", "strokes" or "unknown" until first generation tells


def _kind_from_class_path(class_path: str) -> str:
    name = class_path.lower()
    if "handwriting" in name:
        return "strokes"
    if "language_model" in name or "char" in name:
        return "text"
    return "unknown"


def _stored_class_path(path: Path) -> str | None:
    """The task class a checkpoint records, read without loading its weights (None if unreadable)."""
    try:
        import torch

        # mmap: only the small hparams dict is actually read from disk.
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
    """Whether the package's task class has ``demo_generate``; None when that cannot be told
    without importing code from outside the package."""
    if not class_path or not class_path.startswith("hypernetworks."):
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except Exception:
        return None
    return callable(getattr(cls, "demo_generate", None))


def checkpoint_kind(path: Path) -> str:
    """Guess what a checkpoint draws ("text", "strokes", "unknown") from its stored task class."""
    return _kind_from_class_path(_stored_class_path(path) or "")


def find_checkpoints(paths: list[str | Path]) -> list[CheckpointEntry]:
    """Expand files and directories (searched recursively for *.ckpt) into uniquely named entries.

    Checkpoints found in a directory whose task has no ``demo_generate`` (an image classifier, say)
    are left out; files named explicitly are always listed.
    """
    found: list[tuple[str, Path, bool]] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*.ckpt") if f.is_file())
            if not files:
                raise ValueError(f"checkpoints: no *.ckpt files under directory {p}")
            found += [(f.relative_to(p).as_posix(), f, False) for f in files]
        elif p.is_file():
            found.append((p.name, p, True))
        else:
            raise ValueError(f"checkpoints: no such file or directory: {p}")
    entries: list[CheckpointEntry] = []
    seen_paths: set[Path] = set()
    used: collections.Counter[str] = collections.Counter()
    for name, path, explicit in found:
        resolved = path.resolve()
        if resolved in seen_paths:
            continue
        seen_paths.add(resolved)
        class_path = _stored_class_path(resolved)
        if not explicit and _has_demo(class_path) is False:
            log.info("skipping %s: %s has no demo_generate", path, class_path)
            continue
        used[name] += 1
        ident = name if used[name] == 1 else f"{name} ({used[name]})"
        entries.append(CheckpointEntry(ident, resolved, _kind_from_class_path(class_path or "")))
    if not entries:
        raise ValueError(f"checkpoints: none of {', '.join(map(str, paths))} holds a text or handwriting model")
    return entries


def _default_loader(path: Path):
    from hypernetworks.training import load_task

    return load_task(path, map_location="cpu")


def _shown(value: Any) -> str:
    return "an empty value" if value == "" else json.dumps(value)[:80]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _to_jsonable(obj: Any) -> Any:
    """numpy / torch scalars and arrays inside a demo_generate result, as plain lists and numbers."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _finite(x: Any) -> Any:
    """Replace NaN/inf (invalid JSON) by None recursively: a diverged model should still be viewable."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x


class DemoApp:
    """Checkpoint registry, request validation and a small cache of loaded tasks."""

    def __init__(
        self,
        checkpoints: list[CheckpointEntry],
        *,
        loader: Callable[[Path], Any] | None = None,
        max_length: int = 2000,
        cache_size: int = 4,
        sources: list[str | Path] | None = None,
    ):
        """``sources``: the files/directories the list came from; when given, the list is rescanned
        on each listing (and for an unknown id), so runs that are still training show up."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.checkpoints = {c.id: c for c in checkpoints}
        self.sources = list(sources or [])
        self.loader = loader or _default_loader
        self.max_length = max_length
        self.cache_size = cache_size
        # id -> (path, mtime, task): a checkpoint rewritten by a training run is loaded again.
        self._cache: collections.OrderedDict[str, tuple[Path, float, Any]] = collections.OrderedDict()
        # One generation at a time: tasks seed global RNGs and share CPU threads.
        self._lock = threading.Lock()

    # --- API -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rescan the sources: new checkpoints appear, deleted ones go (ids are relative paths, so stable)."""
        if not self.sources:
            return
        present = [src for src in self.sources if Path(src).expanduser().exists()]
        try:
            entries = find_checkpoints(present) if present else []
        except ValueError:
            entries = []
        self.checkpoints = {c.id: c for c in entries}  # one assignment: readers see old or new

    def list_checkpoints(self) -> dict:
        self.refresh()
        return {
            "checkpoints": [{"id": c.id, "name": c.id, "kind": c.kind} for c in self.checkpoints.values()],
            "limits": {
                "length": [1, self.max_length],
                "temperature": list(TEMPERATURE_RANGE),
                "seed": list(SEED_RANGE),
                "prime_chars": MAX_PRIME_CHARS,
            },
        }

    def parse_generate(self, body: bytes) -> dict:
        try:
            req = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise RequestError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(req, dict):
            raise RequestError(400, "request body must be a JSON object")
        unknown = sorted(set(req) - GENERATE_FIELDS)
        if unknown:
            raise RequestError(400, f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(GENERATE_FIELDS))}")
        ckpt = req.get("checkpoint")
        if not isinstance(ckpt, str) or not ckpt:
            raise RequestError(400, "checkpoint must be a non-empty string (one of GET /api/checkpoints)")
        if ckpt not in self.checkpoints:
            self.refresh()
        if ckpt not in self.checkpoints:
            raise RequestError(404, f"unknown checkpoint {ckpt!r}")
        length = req.get("length", 200)
        if isinstance(length, float) and length.is_integer():
            length = int(length)
        if isinstance(length, bool) or not isinstance(length, int):
            raise RequestError(400, f"length must be an integer, got {_shown(length)}")
        if not 1 <= length <= self.max_length:
            raise RequestError(400, f"length must be between 1 and {self.max_length}, got {length}")
        temperature = req.get("temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise RequestError(400, f"temperature must be a number, got {_shown(temperature)}")
        lo, hi = TEMPERATURE_RANGE
        if not lo <= temperature <= hi:
            raise RequestError(400, f"temperature must be between {lo} and {hi}, got {temperature}")
        seed = req.get("seed", 0)
        if isinstance(seed, float) and seed.is_integer():
            seed = int(seed)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RequestError(400, f"seed must be an integer, got {_shown(seed)}")
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise RequestError(400, f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {seed}")
        prime = req.get("prime", "")
        if not isinstance(prime, str):
            raise RequestError(400, f"prime must be a string, got {_shown(prime)}")
        if len(prime) > MAX_PRIME_CHARS:
            raise RequestError(400, f"prime must be at most {MAX_PRIME_CHARS} characters, got {len(prime)}")
        return {"checkpoint": ckpt, "length": length, "temperature": float(temperature), "seed": seed, "prime": prime}

    def task(self, ckpt_id: str):
        """The loaded task for a checkpoint id (LRU cache); call with self._lock held."""
        entry = self.checkpoints.get(ckpt_id)
        if entry is None:  # removed by a rescan since the request was checked
            raise RequestError(404, f"unknown checkpoint {ckpt_id!r}")
        try:
            mtime = entry.path.stat().st_mtime
        except OSError:
            self._cache.pop(ckpt_id, None)
            raise RequestError(404, f"checkpoint {ckpt_id!r} no longer exists ({entry.path})") from None
        cached = self._cache.get(ckpt_id)
        if cached is not None and cached[:2] == (entry.path, mtime):
            self._cache.move_to_end(ckpt_id)
            return cached[2]
        try:
            task = self.loader(entry.path)
        except Exception as e:
            log.exception("loading %s failed", entry.path)
            raise RequestError(500, f"could not load checkpoint {ckpt_id!r}: {type(e).__name__}: {e}") from None
        if not callable(getattr(task, "demo_generate", None)):
            raise RequestError(400, f"checkpoint {ckpt_id!r} ({type(task).__name__}) has no demo_generate: not a text or handwriting model")
        if hasattr(task, "eval"):
            task.eval()
        self._cache[ckpt_id] = (entry.path, mtime, task)
        self._cache.move_to_end(ckpt_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return task

    def generate(self, body: bytes) -> dict:
        args = self.parse_generate(body)
        ckpt_id = args.pop("checkpoint")
        with self._lock:
            task = self.task(ckpt_id)
            try:
                result = task.demo_generate(**args)
            except ValueError as e:  # the task's own check of its arguments (e.g. prime outside the vocabulary)
                raise RequestError(400, str(e)) from None
            except Exception as e:
                log.error("demo_generate failed for %s:\n%s", ckpt_id, traceback.format_exc())
                raise RequestError(500, f"generation failed: {type(e).__name__}: {e}") from None
        try:
            result = json.loads(json.dumps(result, default=_to_jsonable))
        except (TypeError, ValueError) as e:
            raise RequestError(500, f"demo_generate returned data that is not JSON-able: {e}") from None
        if not isinstance(result, dict) or result.get("kind") not in ("text", "strokes"):
            raise RequestError(500, "demo_generate must return a dict with kind 'text' or 'strokes'")
        if not isinstance(result.get("steps"), list) or not isinstance(result.get("intensity"), list):
            raise RequestError(500, "demo_generate must return lists 'steps' and 'intensity'")
        if ckpt_id in self.checkpoints:
            self.checkpoints[ckpt_id].kind = result["kind"]
        result["checkpoint"] = ckpt_id
        return _finite(result)


class DemoHandler(BaseHTTPRequestHandler):
    server_version = "hypernetworks-serve/1"
    # A client that opens a connection and sends nothing must not hold a thread forever.
    timeout = 30
    app: DemoApp  # set on the subclass built by make_server

    # --- plumbing ------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message, "status": status})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (malformed request line, ...) as JSON too, without its HTML page.
        self.close_connection = True
        try:
            self._error(code, message or HTTPStatus(code).phrase)
        except Exception:
            pass

    # --- routes --------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/api/checkpoints":
            self._json(200, self.app.list_checkpoints())
        elif path == "/api/generate":
            self._error(405, "use POST for /api/generate")
        elif path.startswith("/api/"):
            self._error(404, f"no API endpoint {path}")
        else:
            self._static(path)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == "/api/checkpoints":
            self._error(405, "use GET for /api/checkpoints")
            return
        if path != "/api/generate":
            self._error(404, f"no POST endpoint {path}")
            return
        try:
            body = self._read_body()
            self._json(200, self.app.generate(body))
        except RequestError as e:
            self._error(e.status, e.message)
        except Exception as e:  # never a stack trace to the client
            log.error("internal error:\n%s", traceback.format_exc())
            self._error(500, f"internal error: {type(e).__name__}")

    def _method_not_allowed(self) -> None:
        self._error(405, f"method {self.command} not allowed")

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _read_body(self) -> bytes:
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestError(411, "Content-Length header required")
        try:
            n = int(raw)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {raw!r}") from None
        if n < 0:
            raise RequestError(400, f"bad Content-Length {raw!r}")
        if n > MAX_BODY_BYTES:
            self.close_connection = True  # do not read (or wait for) a huge body
            raise RequestError(413, f"request body too large ({n} bytes; at most {MAX_BODY_BYTES})")
        body = self.rfile.read(n)
        if len(body) != n:
            raise RequestError(400, "request body shorter than Content-Length")
        return body

    def _static(self, path: str) -> None:
        name = unquote(path).lstrip("/") or "index.html"
        if name.startswith("static/"):
            name = name[len("static/"):]
        # Only the files that exist directly in static/ are served: no separators, no dot files,
        # so no path (encoded or not) can leave the folder.
        files = _static_files()
        if name not in files:
            self._error(404, f"not found: {path}")
            return
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        self._send(200, files[name].read_bytes(), ctype)


def _static_files() -> dict[str, Path]:
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and not p.name.startswith(".")}


def make_server(
    checkpoints: list[str | Path] | list[CheckpointEntry],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    loader: Callable[[Path], Any] | None = None,
    max_length: int = 2000,
) -> ThreadingHTTPServer:
    """Build (and bind) the demo server; ``server.app`` is its DemoApp. Port 0 picks a free port."""
    if not checkpoints:
        raise ValueError("checkpoints: need at least one checkpoint file or directory")
    if isinstance(checkpoints[0], CheckpointEntry):
        entries, sources = list(checkpoints), None
    else:
        entries, sources = find_checkpoints(checkpoints), list(checkpoints)  # type: ignore[arg-type]
    app = DemoApp(entries, loader=loader, max_length=max_length, sources=sources)  # type: ignore[arg-type]
    handler = type("BoundDemoHandler", (DemoHandler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.app = app  # type: ignore[attr-defined]
    return server


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hypernetworks serve",
        description="Local demo page: pick a checkpoint, press Generate, watch the text or handwriting "
        "appear beside the HyperLSTM's weight-change traces.",
    )
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="PATH",
                   help="checkpoint files (.ckpt) and/or directories searched recursively for *.ckpt")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; the server has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-length", type=int, default=2000, help="largest generation length a request may ask for")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0 <= args.port <= 65535:
        print(f"hypernetworks serve: --port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.max_length < 1:
        print(f"hypernetworks serve: --max-length must be >= 1, got {args.max_length}", file=sys.stderr)
        return 2
    try:
        server = make_server(args.checkpoints, args.host, args.port, max_length=args.max_length)
    except ValueError as e:
        print(f"hypernetworks serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"hypernetworks serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can run the models", file=sys.stderr)
    for c in server.app.checkpoints.values():  # type: ignore[attr-defined]
        print(f"  {c.kind:<8} {c.id}  ({c.path})")
    print(f"serving on http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

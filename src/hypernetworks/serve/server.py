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

The parts, each holding its own safety rules:

* ``index.py``: which files are served (regular files only, read once per version, no file I/O
  under the index lock);
* ``generation.py``: loading tasks (refused files remembered), the bounded queue (503 +
  Retry-After), streaming steps as they are made;
* ``app.py``: routes, the request model, Host/Origin checks, the body limit, JSON errors;
* ``protocol.py``: connection limits (header and body timeouts, connections per address and in
  all, stalled responses);
* this module: the server object and the command line.

It binds 127.0.0.1 by default: there is no authentication.
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI

# Re-exported: the names other code and tests import from here.
from hypernetworks.serve.app import (DEFAULT_ALLOWED_HOSTS, MAX_BODY_BYTES, STATIC_DIR, BodyLimitMiddleware,  # noqa: F401
                                     HostCheckMiddleware, JSONErrorsMiddleware, OriginCheckMiddleware, _JSONRequest,
                                     _Route, _validation_message, generate_request_model, make_app)
from hypernetworks.serve.errors import RequestError, error_response as _error_response  # noqa: F401
from hypernetworks.serve.errors import scrub as _scrub, shown as _shown  # noqa: F401
from hypernetworks.serve.generation import (KINDS, MAX_PRIME_CHARS, SEED_RANGE, TEMPERATURE_RANGE,  # noqa: F401
                                            DemoApp, GenerationQueue, Ticket, _close_later, _default_loader,
                                            _finite, _take)
from hypernetworks.serve.index import (CheckpointEntry, CheckpointIndex, _has_demo, _kind_from_class_path,  # noqa: F401
                                       _stored_class_path, checkpoint_kind, find_checkpoints)
from hypernetworks.serve.protocol import ConnectionLimits, LimitedH11Protocol, protocol_class  # noqa: F401

log = logging.getLogger("hypernetworks.serve")


class DemoServer:
    """uvicorn serving the app on a socket bound at construction (port 0 picks a free port), with
    the connection limits of ``limits`` (see ``protocol.py``)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
                 limits: ConnectionLimits | None = None):
        self.app = app
        self.limits = limits or ConnectionLimits()
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
        self.protocol = protocol_class(self.limits)  # .stats counts what the limits did
        # No limit_concurrency: uvicorn's counts connections still sending headers, so slow clients
        # could fill it; the protocol's caps and timeouts bound those instead.
        self.config = uvicorn_config(app, log_level=log_level, http=self.protocol)
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


def make_server(checkpoints: list[str | Path], host: str = "127.0.0.1", port: int = 8000, *,
                limits: ConnectionLimits | None = None, **app_kw) -> DemoServer:
    """Build the app and bind its server (not yet serving: ``.start()`` or ``.serve_forever()``)."""
    log_level = app_kw.pop("log_level", "warning")
    return DemoServer(make_app(checkpoints, **app_kw), host, port, log_level=log_level, limits=limits)


def build_parser() -> argparse.ArgumentParser:
    d = ConnectionLimits()
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
    g = p.add_argument_group("connection limits", "so that slow or greedy clients cannot lock others out")
    g.add_argument("--header-timeout", type=float, default=d.header_timeout, metavar="S",
                   help="seconds a client has to send a request's line and headers, from connecting or from "
                   f"the previous response; then 408 and the connection is closed (default {d.header_timeout:g})")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout, metavar="S",
                   help="seconds a client has to send a request's body after its headers; then the "
                   f"connection is closed (default {d.body_timeout:g})")
    g.add_argument("--max-connections-per-client", type=int, default=d.max_per_client, metavar="N",
                   help="open connections allowed from one client address; a further one gets 429 and "
                   f"is closed (default {d.max_per_client})")
    g.add_argument("--max-connections", type=int, default=d.max_connections, metavar="N",
                   help=f"open connections allowed in all; a further one gets 503 and is closed (default {d.max_connections})")
    g.add_argument("--stall-timeout", type=float, default=d.stall_timeout, metavar="S",
                   help="seconds a response (a generation's event stream, say) may stay blocked because "
                   "the client is not reading it; then the connection is closed and the generation "
                   f"stopped (default {d.stall_timeout:g})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, value, low in (("--port", args.port, 0), ("--max-length", args.max_length, 1),
                             ("--workers", args.workers, 1), ("--queue", args.queue, 0),
                             ("--max-connections-per-client", args.max_connections_per_client, 1),
                             ("--max-connections", args.max_connections, 1)):
        if value < low or (name == "--port" and value > 65535):
            limit = "in 0..65535" if name == "--port" else f">= {low}"
            print(f"hypernetworks serve: {name} must be {limit}, got {value}", file=sys.stderr)
            return 2
    for name, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout),
                        ("--stall-timeout", args.stall_timeout)):
        if not value > 0:  # also NaN
            print(f"hypernetworks serve: {name} must be > 0 seconds, got {value}", file=sys.stderr)
            return 2
    limits = ConnectionLimits(header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                              max_per_client=args.max_connections_per_client,
                              max_connections=args.max_connections, stall_timeout=args.stall_timeout)
    try:
        server = make_server(args.checkpoints, args.host, args.port, max_length=args.max_length,
                             workers=args.workers, queue=args.queue, allowed_hosts=args.allowed_hosts,
                             allowed_origins=args.allowed_origins, log_level="info", limits=limits)
    except (ValueError, AssertionError) as e:  # bad --allowed-hosts patterns included
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

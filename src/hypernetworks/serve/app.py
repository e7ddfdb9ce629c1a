"""The demo's web app: routes, the request model, and the checks every request passes.

Safety rules, all in this module (the connection-level ones are in ``protocol.py``):

* Host header (400) and Origin header (403) checks against the names the server was told to
  answer to (:class:`HostCheckMiddleware`, :class:`OriginCheckMiddleware`): stops DNS-rebinding
  pages and pages on other sites from driving the models.
* Request bodies over :data:`MAX_BODY_BYTES` are refused (413), from ``Content-Length`` without
  reading them, or as soon as a chunked body passes the limit (:class:`BodyLimitMiddleware`).
* Bodies are parsed with a depth-limited JSON parser and validated against a declared model
  (strict types, unknown fields refused).
* Every error a client sees is ``{"error": message, "status": code}``: the app's own errors,
  validation errors, Starlette's (404, 405) and, as a last resort, any plain-text error response
  from inside the app (:class:`JSONErrorsMiddleware`). No stack traces, no absolute paths.
"""

import http
import json
import logging
from pathlib import Path
from typing import Any, Callable
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
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypernetworks.serve.errors import RequestError, error_body, error_response, shown
from hypernetworks.serve.generation import (MAX_PRIME_CHARS, SEED_RANGE, TEMPERATURE_RANGE, DemoApp, Ticket)
from hypernetworks.serve.index import CheckpointIndex

log = logging.getLogger("hypernetworks.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 * 1024
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]")


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


# ------------------------------------------------------------------------------ request parsing
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
        got = "" if err.get("type") in ("missing", "extra_forbidden") else f", got {shown(err.get('input'))}"
        parts.append(f"{field or 'body'}: {msg}{got}")
    return "; ".join(parts) or "invalid request"


# ------------------------------------------------------------------------------ middleware
class HostCheckMiddleware(TrustedHostMiddleware):
    """Refuse (400, JSON) a request whose Host header names none of ``allowed_hosts`` (exact
    names, or ``*.example.org`` patterns): a DNS-rebinding page reaches the server under its own
    name and is refused here."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        try:
            super().__init__(app, allowed_hosts=allowed_hosts, www_redirect=False)
        except AssertionError as e:
            raise ValueError(f"--allowed-hosts: {e}") from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allow_any or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("host")
        host = _host_name(header)
        if host is not None and any(host == p or (p.startswith("*") and host.endswith(p[1:]))
                                    for p in self.allowed_hosts):
            await self.app(scope, receive, send)
            return
        what = "no Host header" if header is None else f"host {shown(header)} is not allowed"
        await error_response(400, f"{what} (hypernetworks serve --allowed-hosts)")(scope, receive, send)


def _host_name(header: str | None) -> str | None:
    """The host part of a Host header, lower case (brackets kept around IPv6); None if malformed."""
    try:
        from starlette._utils import parse_host_header
    except ImportError:  # pragma: no cover - older Starlette
        parse_host_header = None
    if header is None:
        return None
    if parse_host_header is not None:
        parsed = parse_host_header(header)
        return None if parsed is None else parsed.host.lower()
    host = header.rsplit(":", 1)[0] if not header.endswith("]") else header
    return host.lower() or None


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
                    response = error_response(403, f"origin {shown(origin)} is not allowed "
                                              "(hypernetworks serve --allowed-origins)")
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit:,} bytes")


class BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes: from ``Content-Length`` before anything is read, or
    when the bytes received pass the limit (a chunked body). The exception raised from
    ``receive`` reaches the app's handler for HTTPException, so the reply is the usual JSON."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        try:
            too_large = declared is not None and int(declared) > self.limit
        except ValueError:
            too_large = False  # h11 refuses a malformed Content-Length before the app sees it
        if too_large:
            await error_response(413, BodyTooLarge(self.limit).detail)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class JSONErrorsMiddleware:
    """The last word on error replies: an error response (status >= 400) that is not already
    JSON, from wherever inside the app it came, is replaced by ``{"error": its text, "status"}``."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def send_json_errors(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                ctype = Headers(raw=message.get("headers", [])).get("content-type", "")
                if not ctype.startswith("application/json"):
                    held["start"], held["body"] = message, b""
                    return
            if "start" in held and message["type"] == "http.response.body":
                held["body"] = (held["body"] + message.get("body", b""))[:2000]
                if message.get("more_body", False):
                    return
                status = held["start"]["status"]
                text = held["body"].decode("utf-8", "replace").strip() or http.HTTPStatus(status).phrase
                body = error_body(status, text[:500])
                keep = [(k, v) for k, v in held["start"].get("headers", [])
                        if k.lower() not in (b"content-type", b"content-length")]
                await send({"type": "http.response.start", "status": status, "headers": keep + [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await send(message)

        await self.app(scope, receive, send_json_errors)


# ------------------------------------------------------------------------------ the app
def make_app(checkpoints: list[str | Path], *, loader: Callable[[Path], Any] | None = None,
             max_length: int = 2000, workers: int = 1, queue: int = 8, flush_interval: float = 0.03,
             allowed_hosts: list[str] | None = None, allowed_origins: list[str] | None = None,
             max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The demo's ASGI app; ``app.state.demo`` is its :class:`DemoApp`."""
    demo = DemoApp(CheckpointIndex(checkpoints), loader=loader, max_length=max_length, workers=workers,
                   queue=queue, flush_interval=flush_interval)
    GenerateRequest = generate_request_model(max_length)
    app = FastAPI(title="hypernetworks demo", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.router.route_class = _Route
    app.state.demo = demo
    # add_middleware puts each one outside the ones before: a request meets them bottom-up here.
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    app.add_middleware(OriginCheckMiddleware, allowed_origins=allowed_origins)
    # A request for another host name is refused before anything else looks at it.
    app.add_middleware(HostCheckMiddleware, allowed_hosts=list(allowed_hosts or DEFAULT_ALLOWED_HOSTS))
    app.add_middleware(JSONErrorsMiddleware)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(422, _validation_message(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # never a stack trace to the client
        log.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}")

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

"""What a client is told when something goes wrong: always ``{"error": message, "status": code}``
as JSON, without stack traces or absolute paths."""
from __future__ import annotations

import http
import json
import os
import re
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from hypernetworks.serve.index import CheckpointIndex


class RequestError(Exception):
    """A client-visible error: a JSON response with this status and message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status,
                        headers={"Cache-Control": "no-store", **(headers or {})})


def raw_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 error response as bytes, for the connection layer, which answers before (or
    instead of) any request reaching the app; it always closes the connection."""
    body = error_body(status, message)
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Cache-Control: no-store", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_ABS_PATH = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:)?[/\\](?:[^\s'\"/\\:]+[/\\])+[^\s'\":,;)]*")


def scrub(message: str, index: CheckpointIndex | None = None) -> str:
    """A message with absolute paths removed: known checkpoint paths become their ids, served
    folders ``<checkpoints>``, anything else that looks like an absolute path ``<path>``."""
    if index is not None:
        for entry in list(index.current().values()):
            message = message.replace(str(entry.path), entry.id)
        for src in index.sources:
            for form in {str(src.resolve()), str(src.absolute()), str(src)}:
                if os.path.isabs(form):
                    message = message.replace(form, "<checkpoints>")
    return _ABS_PATH.sub("<path>", message)


def shown(value: Any) -> str:
    """A client-sent value, quoted and shortened, for a message."""
    if value == "":
        return "an empty value"
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return type(value).__name__

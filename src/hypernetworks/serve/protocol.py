"""The connection layer: uvicorn's h11 protocol with the limits that keep one slow or greedy
client from locking the others out.

Safety rules, all in this module (:class:`LimitedH11Protocol`):

* **Header timeout**: a request's line and headers must arrive within ``header_timeout`` seconds
  of the connection opening (or of the previous response, on a kept-alive connection); otherwise
  the server answers 408 and closes. uvicorn itself has no such timeout, so a client sending its
  headers a byte at a time could hold a connection for ever.
* **Body timeout**: the body must arrive within ``body_timeout`` seconds of the headers; otherwise
  the connection is closed (408 if no response has started).
* **Connections per client address**: at most ``max_per_client`` open connections from one
  address; a further one is answered 429 and closed. At most ``max_connections`` in all; a further
  one is answered 503 and closed. Only requests actually being served count against the app's
  capacity: connections still sending headers are bounded by these caps and the header timeout.
* **Stalled responses**: a response (an event stream, say) that the client stops reading is
  closed once nothing could be written to it for ``stall_timeout`` seconds, which ends the
  generation and frees its worker.
* Every answer from this layer is the documented JSON error, as is the 400 for a malformed request.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from hypernetworks.serve.errors import raw_error_response

log = logging.getLogger("hypernetworks.serve")

# Seconds a refused connection is kept open (reading and discarding) so that the client reads the
# answer instead of a reset.
REFUSAL_LINGER_S = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_per_client: int = 64
    max_connections: int = 512
    stall_timeout: float = 30.0

    def __post_init__(self):
        for name in ("header_timeout", "body_timeout", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_per_client", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class LimitedH11Protocol(H11Protocol):
    """One connection. Use :func:`protocol_class` for a class bound to one server's limits and
    counters; uvicorn makes an instance per connection."""

    limits: ConnectionLimits = ConnectionLimits()
    per_client: collections.Counter  # open connections by client address (this server's)
    stats: collections.Counter  # what the limits did, for tests and benchmarks

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._phase = ""  # "headers", "body" or "" (nothing timed)
        self._stall: asyncio.TimerHandle | None = None
        self._address: str | None = None
        self._refused = False

    # -------------------------------------------------------------- opening and closing
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else "?"
        if len(self.connections) >= self.limits.max_connections:
            self._refuse(transport, 503, "too many connections to this server "
                         f"({self.limits.max_connections}); try again shortly", "refused_total")
            return
        if self.per_client[address] >= self.limits.max_per_client:
            self._refuse(transport, 429, f"too many connections from your address "
                         f"({self.limits.max_per_client}); close some and retry", "refused_per_client")
            return
        self._address = address
        self.per_client[address] += 1
        super().connection_made(transport)
        self._arm("headers")

    def _refuse(self, transport: asyncio.Transport, status: int, message: str, counter: str) -> None:
        """Answer at once and close soon; what the client sends meanwhile is read and dropped (so
        the close is not a reset that could destroy the answer before the client reads it)."""
        self._refused = True
        self.transport = transport
        self.stats[counter] += 1
        transport.write(raw_error_response(status, message, {"Retry-After": "1"}))
        self.loop.call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._follow()

    def eof_received(self) -> bool | None:
        if self._refused:
            self.transport.close()
            return None
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._cancel()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._address is not None:
            self.per_client[self._address] -= 1
            if self.per_client[self._address] <= 0:
                del self.per_client[self._address]
            self._address = None
        super().connection_lost(exc)

    # -------------------------------------------------------------- header and body deadlines
    def _arm(self, phase: str) -> None:
        self._cancel()
        self._phase = phase
        seconds = self.limits.header_timeout if phase == "headers" else self.limits.body_timeout
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, ""

    def _follow(self) -> None:
        """Move the deadline along with the request: headers, then body, then none."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._phase != "headers" and not self.transport.is_closing():
                self._arm("headers")
        elif state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body")
        elif self._phase:
            self._cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._follow()  # the next request on this connection has its own deadline

    def _timed_out(self) -> None:
        phase, self._timer, self._phase = self._phase, None, ""
        if self.transport.is_closing():
            return
        self.stats[f"{phase}_timeouts"] += 1
        seconds = self.limits.header_timeout if phase == "headers" else self.limits.body_timeout
        cycle = self.cycle
        if phase == "headers":  # between requests: nothing is being answered
            answer = self.conn.our_state is h11.IDLE
        else:
            answer = cycle is not None and not cycle.response_started
            if cycle is not None:  # the app may be waiting for the body: it sees the client as gone
                cycle.disconnected = True
                cycle.message_event.set()
        if answer:
            what = "headers" if phase == "headers" else "body"
            self.transport.write(raw_error_response(
                408, f"request {what} not received within {seconds:g} s; closing the connection"))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self.stats["bad_requests"] += 1
        self._cancel()
        self.transport.write(raw_error_response(400, msg))
        self.transport.close()

    # -------------------------------------------------------------- stalled responses
    def pause_writing(self) -> None:
        if self._refused:
            return
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.limits.stall_timeout, self._stalled)

    def resume_writing(self) -> None:
        if self._refused:
            return
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        self.stats["stalled"] += 1
        log.info("closing a connection from %s: nothing could be written to it for %g s",
                 self._address, self.limits.stall_timeout)
        self.transport.abort()  # drop what is buffered: the client is not reading it


def protocol_class(limits: ConnectionLimits) -> type[LimitedH11Protocol]:
    """A protocol class for one server: its limits, its per-address counts and its stats."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {
        "limits": limits, "per_client": collections.Counter(), "stats": collections.Counter()})

"""The demo server's limits against hostile or careless clients and files: special files in a
served folder, unreadable files asked for again and again, slow headers and bodies, many
connections from one address, clients that stop reading, and every error in the JSON form.

Real uvicorn on a free loopback port with small limits, so each test takes about a second."""
from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from hypernetworks.serve import index as index_mod
from hypernetworks.serve import server as srv
from hypernetworks.serve.protocol import ConnectionLimits

LM = "hypernetworks.tasks.language_model.LanguageModelTask"
TIMEOUT = 10  # seconds: a request that takes longer than this is a wedged server


class FakeTextTask:
    demo_kind = "text"

    def demo_stream(self, length=200, temperature=1.0, seed=0, prime=""):
        for t in range(length):
            yield "ab"[t % 2], [0.1, 0.2, 0.3, 0.4]


class BigStepTask:
    """Steps of 64 KiB each: a client that does not read fills every buffer within a few steps."""

    demo_kind = "text"

    def __init__(self):
        self.made = 0

    def demo_stream(self, length=200, temperature=1.0, seed=0, prime=""):
        for _ in range(length):
            self.made += 1
            yield "x" * 65536, [0.0] * 4


class GatedTask:
    demo_kind = "text"

    def __init__(self):
        self.gate = threading.Event()

    def demo_stream(self, length=200, temperature=1.0, seed=0, prime=""):
        for t in range(length):
            if t == 1:
                assert self.gate.wait(20), "the test never opened the gate"
            yield "x", [0.0] * 4


def _ckpt(path: Path, class_path: str = LM) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": class_path}}, path)
    return path


def request(server, method, path, body=None, headers=None, source=None):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT, source_address=(source, 0) if source else None)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    return resp, payload


def _json_error(resp, payload, status):
    """The reply is the documented JSON error with this status."""
    assert resp.status == status, payload
    assert resp.getheader("Content-Type", "").startswith("application/json"), resp.getheaders()
    data = json.loads(payload)
    assert data["status"] == status and isinstance(data["error"], str) and data["error"], data
    return data["error"]


def _raw(server, data: bytes = b"", source: str | None = None) -> socket.socket:
    s = socket.create_connection(server.server_address, timeout=TIMEOUT,
                                 source_address=(source, 0) if source else None)
    if data:
        s.sendall(data)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _parse_raw(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert b"application/json" in head.lower(), head
    return status, json.loads(body)


def _second_loopback() -> str:
    """A second local address to connect from (any 127/8 address is local on Linux)."""
    try:
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.close()
    except OSError:
        pytest.skip("this machine cannot bind a second loopback address (127.0.0.2), which the per-address limit test needs")
    return "127.0.0.2"


def _server(tmp_path, task=None, limits=None, **kw):
    ck = _ckpt(tmp_path / "a.ckpt")
    task = task or FakeTextTask()
    return srv.make_server([tmp_path], port=0, loader=lambda p: task, limits=limits, flush_interval=0, **kw).start()


# ------------------------------------------------------------------------------ special and refused files
def _unblock(fifo: Path) -> None:
    """Let a reader stuck opening the FIFO go (if the server is wedged on it): open it for writing."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="this system has no named pipes (os.mkfifo), which the test needs")
def test_fifo_named_ckpt_does_not_wedge_the_server(tmp_path):
    fifo = tmp_path / "evil.ckpt"
    os.mkfifo(tmp_path / "there-at-start.ckpt")
    made: list = []
    starter = threading.Thread(target=lambda: made.append(_server(tmp_path)), daemon=True)
    starter.start()
    starter.join(TIMEOUT)
    if not made:
        _unblock(tmp_path / "there-at-start.ckpt")
        pytest.fail("the server did not start with a FIFO named *.ckpt in its folder")
    server = made[0]
    try:
        os.mkfifo(fifo)  # after start: the folder changed, so the next request rescans
        t0 = time.monotonic()
        resp, payload = request(server, "GET", "/api/checkpoints")
        assert resp.status == 200 and time.monotonic() - t0 < 5
        assert [c["id"] for c in json.loads(payload)["checkpoints"]] == ["a.ckpt"]
        resp, payload = request(server, "POST", "/api/generate", {"checkpoint": "evil.ckpt", "length": 2})
        assert "unknown checkpoint" in _json_error(resp, payload, 404)
        resp, _ = request(server, "POST", "/api/generate", {"checkpoint": "a.ckpt", "length": 2})
        assert resp.status == 200
        # A served file replaced by a FIFO is refused, not waited on.
        (tmp_path / "a.ckpt").unlink()
        os.mkfifo(tmp_path / "a.ckpt")
        resp, payload = request(server, "POST", "/api/generate", {"checkpoint": "a.ckpt", "length": 2})
        assert resp.status == 404, payload
        assert time.monotonic() - t0 < 8
    finally:
        for f in tmp_path.glob("*.ckpt"):
            _unblock(f)
        server.shutdown()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="this system has no named pipes (os.mkfifo), which the test needs")
def test_header_read_never_opens_a_special_file_blocking(tmp_path):
    fifo = tmp_path / "x.ckpt"
    os.mkfifo(fifo)
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("class", index_mod._stored_class_path(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    _unblock(fifo)
    assert not reader.is_alive() and result == {"class": None}


def test_header_read_refuses_a_compressed_archive_before_unpacking(tmp_path, monkeypatch):
    """A small file whose zip member inflates to a lot is refused from the zip directory alone:
    nothing is inflated and torch.load is never called."""
    import zipfile

    bomb = tmp_path / "bomb.ckpt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb/data.pkl", b"\0" * (8 << 20))
    assert bomb.stat().st_size < 1 << 20
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    t0 = time.monotonic()
    assert index_mod._stored_class_path(bomb) is None
    assert calls == [] and time.monotonic() - t0 < 1


def test_rescan_happens_outside_the_index_lock(tmp_path, monkeypatch):
    """While one thread reads a new file's header (here: blocked), others answer at once from the
    last listing; the new file appears once that read is done."""
    _ckpt(tmp_path / "a.ckpt")
    index = srv.CheckpointIndex([tmp_path], scan_wait=0.3)
    reading, release = threading.Event(), threading.Event()
    real = index_mod._stored_class_path

    def slow(path):
        reading.set()
        assert release.wait(20)
        return real(path)

    monkeypatch.setattr(index_mod, "_stored_class_path", slow)
    _ckpt(tmp_path / "b.ckpt")
    scanner = threading.Thread(target=index.entries, daemon=True)
    scanner.start()
    try:
        assert reading.wait(TIMEOUT)
        t0 = time.monotonic()
        assert list(index.current()) == ["a.ckpt"]
        assert list(index.entries()) == ["a.ckpt"]  # waited at most scan_wait for the scan, then the old listing
        assert index.get("a.ckpt") is not None
        assert time.monotonic() - t0 < 2
    finally:
        release.set()
        scanner.join(TIMEOUT)
    assert sorted(index.entries()) == ["a.ckpt", "b.ckpt"]


def test_unreadable_files_are_read_once_per_version(tmp_path, monkeypatch):
    """Listing: an unreadable file's header is read once, not at every rescan. Generating: a file
    that fails to load is loaded once; later requests get the remembered error at once, even while
    the only worker is busy; a rewritten file is tried again."""
    _ckpt(tmp_path / "good.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip" * 100)
    reads: list[Path] = []
    real = index_mod._stored_class_path
    monkeypatch.setattr(index_mod, "_stored_class_path", lambda p: reads.append(p.name) or real(p))
    gated = GatedTask()
    loads: list[str] = []

    def loader(path):
        loads.append(path.name)
        if path.name == "bad.ckpt":
            raise ValueError(f"{path} is damaged: archive member 'x' fails its CRC-32 check")
        return gated

    server = srv.make_server([tmp_path], port=0, loader=loader, workers=1, queue=2, flush_interval=0).start()
    try:
        for i in range(3):
            _ckpt(tmp_path / f"new{i}.ckpt")  # folder changes: a rescan each time
            resp, payload = request(server, "GET", "/api/checkpoints")
            assert "bad.ckpt" in payload.decode()
        assert reads.count("bad.ckpt") == 1 and reads.count("good.ckpt") == 1
        body = {"checkpoint": "bad.ckpt", "length": 2}
        resp, payload = request(server, "POST", "/api/generate", body)
        first = _json_error(resp, payload, 500)
        assert "CRC-32" in first and str(tmp_path) not in first
        # The only worker busy with another generation: the refused file still answers at once.
        host, port = server.server_address
        busy = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        busy.request("POST", "/api/generate/stream", json.dumps({"checkpoint": "good.ckpt", "length": 3}),
                     {"Content-Type": "application/json"})
        stream = busy.getresponse()
        assert stream.status == 200 and b"event: start" in stream.readline()
        for _ in range(5):
            t0 = time.monotonic()
            resp, payload = request(server, "POST", "/api/generate", body)
            assert _json_error(resp, payload, 500) == first and time.monotonic() - t0 < 2
        assert loads.count("bad.ckpt") == 1
        gated.gate.set()
        stream.read()
        busy.close()
        st = bad.stat()
        os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten: tried again
        resp, payload = request(server, "POST", "/api/generate", body)
        _json_error(resp, payload, 500)
        assert loads.count("bad.ckpt") == 2
    finally:
        gated.gate.set()
        server.shutdown()


# ------------------------------------------------------------------------------ slow and greedy clients
def test_slow_headers_get_408_and_are_closed(tmp_path):
    server = _server(tmp_path, limits=ConnectionLimits(header_timeout=0.6))
    try:
        s = _raw(server)
        t0 = time.monotonic()
        closed_after = None
        for byte in b"GET /api/checkpoints HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200:
            try:
                s.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.02)
            if time.monotonic() - t0 > 3:
                break
        reply = _read_all(s)
        closed_after = time.monotonic() - t0
        s.close()
        status, data = _parse_raw(reply)
        assert status == 408 and data["status"] == 408 and "headers" in data["error"]
        assert 0.5 < closed_after < 3.5
        assert server.protocol.stats["headers_timeouts"] == 1
        # A connection that sends nothing at all is closed too.
        s = _raw(server)
        t0 = time.monotonic()
        status, data = _parse_raw(_read_all(s))
        s.close()
        assert status == 408 and 0.5 < time.monotonic() - t0 < 3
        # A client that sends its headers in time, slowly, is served; and the next request on the
        # same connection has a fresh deadline.
        conn = http.client.HTTPConnection(*server.server_address, timeout=TIMEOUT)
        for _ in range(3):
            conn.request("GET", "/api/checkpoints")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read()
            time.sleep(0.4)  # 1.2 s on one connection in all: more than one header timeout
        # The next request on a kept-alive connection that does not come in time gets the 408 too.
        conn.sock.sendall(b"GET /api/checkpoints HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        status, data = _parse_raw(_read_all(conn.sock))
        assert status == 408
        conn.close()
    finally:
        server.shutdown()


def test_slow_body_is_cut_off(tmp_path):
    server = _server(tmp_path, limits=ConnectionLimits(body_timeout=0.5))
    try:
        s = _raw(server, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 40\r\n\r\n{\"checkpoint\"")
        t0 = time.monotonic()
        reply = _read_all(s)
        s.close()
        status, data = _parse_raw(reply)
        assert status == 408 and "body" in data["error"]
        assert time.monotonic() - t0 < 3
    finally:
        server.shutdown()


def test_connections_per_address_and_in_all_are_capped(tmp_path):
    other = _second_loopback()
    server = _server(tmp_path, limits=ConnectionLimits(max_per_client=3, max_connections=5, header_timeout=30))
    held: list[socket.socket] = []
    try:
        held += [_raw(server, b"GET / HTTP/1.1\r\nHo") for _ in range(3)]  # slow clients at their cap
        time.sleep(0.2)
        s = _raw(server)
        t0 = time.monotonic()
        s.sendall(b"GET /api/checkpoints HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, data = _parse_raw(_read_all(s))
        s.close()
        assert status == 429 and "too many connections from your address" in data["error"]
        assert time.monotonic() - t0 < 3
        resp, payload = request(server, "GET", "/api/checkpoints", source=other)  # others are served
        assert resp.status == 200, payload
        held += [_raw(server, b"GET / HTTP/1.1\r\nHo", source=other) for _ in range(2)]  # 5 in all
        time.sleep(0.2)
        s = _raw(server, source="127.0.0.3")
        s.sendall(b"GET /api/checkpoints HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, data = _parse_raw(_read_all(s))
        s.close()
        assert status == 503 and "too many connections" in data["error"]
        for h in held[:2]:
            h.close()
        time.sleep(0.3)
        resp, _ = request(server, "GET", "/api/checkpoints")  # a place freed: served again
        assert resp.status == 200
        assert server.protocol.stats["refused_per_client"] == 1 and server.protocol.stats["refused_total"] == 1
    finally:
        for h in held:
            h.close()
        server.shutdown()


def test_a_client_that_stops_reading_loses_its_stream_and_the_worker_is_freed(tmp_path):
    task = BigStepTask()
    server = _server(tmp_path, task=task, limits=ConnectionLimits(stall_timeout=0.5), workers=1, queue=0)
    queue = server.app.state.demo.queue
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(TIMEOUT)
        s.connect(server.server_address)
        body = json.dumps({"checkpoint": "a.ckpt", "length": 2000}).encode()
        s.sendall(b"POST /api/generate/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + TIMEOUT
        while queue.running == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert queue.running == 1
        while (queue.running or queue.admitted) and time.monotonic() < deadline:
            time.sleep(0.05)  # never reading
        assert queue.running == 0 and queue.admitted == 0, "the stalled stream still holds the worker"
        assert server.protocol.stats["stalled"] == 1
        made = task.made
        assert made < 2000
        s.close()
        resp, _ = request(server, "POST", "/api/generate", {"checkpoint": "a.ckpt", "length": 2})
        assert resp.status == 200  # the worker is free
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------ JSON errors everywhere
def test_errors_from_every_layer_are_json(tmp_path):
    server = _server(tmp_path, limits=ConnectionLimits(max_per_client=50))
    try:
        resp, payload = request(server, "POST", "/api/generate", b"{}", headers={"Content-Length": str(10**9)})
        assert "larger than" in _json_error(resp, payload, 413)
        resp, payload = request(server, "POST", "/api/generate", b" " * (srv.MAX_BODY_BYTES + 1))
        _json_error(resp, payload, 413)
        # A chunked body (no Content-Length) past the limit.
        host, port = server.server_address
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        conn.request("POST", "/api/generate", body=iter([b" " * 40000] * 3), encode_chunked=True,
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        _json_error(resp, resp.read(), 413)
        conn.close()
        resp, payload = request(server, "GET", "/api/checkpoints", headers={"Host": "evil.example"})
        assert "--allowed-hosts" in _json_error(resp, payload, 400)
        s = _raw(server, b"GET /api/checkpoints HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n")
        status, data = _parse_raw(_read_all(s))
        s.close()
        assert status == 400 and data["status"] == 400
        resp, payload = request(server, "GET", "/static/nothing.js")
        _json_error(resp, payload, 404)
    finally:
        server.shutdown()
    gated = GatedTask()
    server = _server(tmp_path, task=gated, workers=1, queue=0)
    try:
        host, port = server.server_address
        busy = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        busy.request("POST", "/api/generate/stream", json.dumps({"checkpoint": "a.ckpt", "length": 3}),
                     {"Content-Type": "application/json"})
        assert busy.getresponse().status == 200
        resp, payload = request(server, "POST", "/api/generate", {"checkpoint": "a.ckpt", "length": 2})
        assert "busy" in _json_error(resp, payload, 503) and resp.getheader("Retry-After")
        gated.gate.set()
        busy.close()
    finally:
        gated.gate.set()
        server.shutdown()


def test_plain_text_errors_inside_the_app_become_json():
    """The last-resort middleware: an error response that is not JSON (from any part of the app or
    a library) reaches the client as {"error", "status"}; JSON errors and successes pass as they are."""
    import asyncio

    from starlette.responses import JSONResponse, PlainTextResponse

    from hypernetworks.serve.app import JSONErrorsMiddleware

    async def call(inner):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await JSONErrorsMiddleware(inner)({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)
        headers = dict(sent[0].get("headers", []))
        return sent[0]["status"], headers.get(b"content-type", b""), b"".join(m.get("body", b"") for m in sent[1:])

    status, ctype, body = asyncio.run(call(PlainTextResponse("Service Unavailable", status_code=503)))
    assert (status, ctype) == (503, b"application/json")
    assert json.loads(body) == {"error": "Service Unavailable", "status": 503}
    status, ctype, body = asyncio.run(call(PlainTextResponse("", status_code=413)))
    assert json.loads(body) == {"error": http.HTTPStatus(413).phrase, "status": 413}
    status, ctype, body = asyncio.run(call(JSONResponse({"error": "x", "status": 404}, status_code=404)))
    assert json.loads(body) == {"error": "x", "status": 404}
    status, ctype, body = asyncio.run(call(PlainTextResponse("fine")))
    assert (status, body) == (200, b"fine")


def test_cli_limits_are_options(tmp_path, capsys):
    help_text = srv.build_parser().format_help()
    for flag in ("--header-timeout", "--body-timeout", "--max-connections-per-client", "--max-connections",
                 "--stall-timeout"):
        assert flag in help_text
    args = srv.build_parser().parse_args(["--checkpoints", "x"])
    assert (args.header_timeout, args.body_timeout, args.max_connections_per_client, args.max_connections,
            args.stall_timeout) == (10.0, 30.0, 64, 512, 30.0)
    _ckpt(tmp_path / "a.ckpt")
    for flag, value in (("--header-timeout", "0"), ("--stall-timeout", "nan"), ("--max-connections-per-client", "0")):
        assert srv.main(["--checkpoints", str(tmp_path), "--port", "0", flag, value]) == 2
        assert flag in capsys.readouterr().err


def test_flood_fast(tmp_path):
    """benchmarks/serve_load.py's slow-header flood, small: 150 connections dripping header bytes
    from another address while a burst of 20 requests from 127.0.0.1 is answered as usual."""
    import importlib.util

    other = _second_loopback()
    spec = importlib.util.spec_from_file_location(
        "serve_load", Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    server = _server(tmp_path, limits=ConnectionLimits(header_timeout=1.0, max_connections=100), workers=1, queue=8)
    flood = serve_load.SlowHeaderFlood(server.url, 150, other, drip=0.2).start()
    try:
        time.sleep(1.5)  # past one header timeout: the first slow connections were closed already
        flood.sampling = True
        results = serve_load.burst(server.url, {"checkpoint": "a.ckpt", "length": 20}, n=20, timeout=TIMEOUT)
    finally:
        summary = flood.stop()
        server.shutdown()
    burst = serve_load.summarize(results)
    assert burst["errors"] == 0 and burst["status"].keys() <= {200, 503}, burst
    assert burst["status"].get(200, 0) >= 9, burst  # 1 running + 8 waiting are always served
    assert summary["closed_by_server"].get("429", 0) > 0 and summary["closed_by_server"].get("408", 0) > 0, summary

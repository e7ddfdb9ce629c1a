"""The demo server over real HTTP (uvicorn on a free loopback port, no browser): listing, streamed
and whole generation, validation, the bounded queue, Host/Origin checks, the checkpoint index, and
the tasks' streaming contract.

Most tasks here are small fakes that follow the demo contract (``demo_kind`` + ``demo_stream``); the
end-to-end tests with real checkpoints are at the end of this file and in test_serve_browser.py.
"""
from __future__ import annotations

import http.client
import importlib.util
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from hypernetworks.serve import server as srv

REPO = Path(__file__).resolve().parents[1]


class FakeTextTask:
    """Deterministic under seed; intensity follows a known pattern so tests can check it is passed through."""

    demo_kind = "text"

    def __init__(self):
        self.steps_made = 0

    def demo_stream(self, length=200, temperature=1.0, seed=0, prime=""):
        if "~" in prime:
            raise ValueError("prime contains characters outside the vocabulary: '~'")
        g = torch.Generator().manual_seed(seed)
        chars = [chr(ord("a") + int(i)) for i in torch.randint(0, 26, (length,), generator=g)]

        def steps():
            for t, c in enumerate(chars):
                self.steps_made += 1
                yield c, [t * 0.1, 1.0, 2.0, float("nan") if t == 1 else 0.5]

        return steps()


class FakeStrokeTask:
    demo_kind = "strokes"

    def demo_stream(self, length=200, temperature=1.0, seed=0, prime=""):
        for t in range(length):  # tensors: the server converts them
            yield torch.tensor([3.0, 0.0, float(t % 5 == 0)]), torch.rand(4)


class BrokenTask:
    demo_kind = "text"

    def demo_stream(self, **kw):
        def steps():
            yield "a", [0.0] * 4
            raise RuntimeError(f"secret internal detail in {REPO}/hypernetworks/x.py")

        return steps()


class GatedTask:
    """Makes ``before`` steps, then waits for ``gate``: the test sees what reached the client while
    the model has not yet computed the rest."""

    demo_kind = "text"

    def __init__(self, before: int = 3):
        self.before = before
        self.gate = threading.Event()
        self.made = 0

    def demo_stream(self, length=200, temperature=1.0, seed=0, prime=""):
        for t in range(length):
            if t == self.before:
                assert self.gate.wait(20), "the test never opened the gate"
            self.made += 1
            yield "x", [float(t)] * 4


def _ckpt(path: Path, class_path: str) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": class_path}}, path)
    return path


LM = "hypernetworks.tasks.language_model.LanguageModelTask"
HW = "hypernetworks.tasks.handwriting.HandwritingTask"


@pytest.fixture()
def fake_server(tmp_path):
    text = _ckpt(tmp_path / "char.ckpt", LM)
    sub = tmp_path / "hw"
    sub.mkdir()
    ink = _ckpt(sub / "ink.ckpt", HW)
    broken = _ckpt(tmp_path / "broken.ckpt", "somewhere.Else")
    missing = _ckpt(tmp_path / "gone.ckpt", "x.Y")
    tasks = {text: FakeTextTask(), ink: FakeStrokeTask(), broken: BrokenTask()}
    loads: list[Path] = []

    def loader(path):
        loads.append(path)
        if path == missing.resolve():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return tasks[path]

    server = srv.make_server([str(text), str(sub), str(broken), str(missing)], port=0, loader=loader,
                             max_length=500, flush_interval=0).start()
    server.loads, server.tasks, server.root = loads, tasks, tmp_path
    yield server
    server.shutdown()


def request(server, method, path, body=None, headers=None, raw=False):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=20)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    if raw:
        return resp, payload
    return resp.status, (json.loads(payload) if resp.getheader("Content-Type", "").startswith("application/json") else payload)


def read_events(resp):
    """Parse a text/event-stream response as it arrives: yields (event, data)."""
    name, data = "message", []
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.decode().rstrip("\r\n")
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def open_stream(server, body, headers=None):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=20)
    conn.request("POST", "/api/generate/stream", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def test_binds_loopback_by_default(tmp_path):
    args = srv.build_parser().parse_args(["--checkpoints", "x.ckpt"])
    assert args.host == "127.0.0.1" and args.port == 8000
    assert args.allowed_hosts == ["localhost", "127.0.0.1", "[::1]"]
    server = srv.make_server([_ckpt(tmp_path / "a.ckpt", LM)], port=0, loader=lambda p: FakeTextTask())
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.socket.close()


def test_lists_checkpoints_with_kind(fake_server):
    status, data = request(fake_server, "GET", "/api/checkpoints")
    assert status == 200
    kinds = {c["id"]: c["kind"] for c in data["checkpoints"]}
    assert kinds == {"char.ckpt": "text", "ink.ckpt": "strokes", "broken.ckpt": "unknown", "gone.ckpt": "unknown"}
    assert data["limits"]["length"] == [1, 500]
    assert fake_server.loads == []  # listing does not load models
    assert str(fake_server.root) not in json.dumps(data)


def test_generate_text_and_cache(fake_server):
    body = {"checkpoint": "char.ckpt", "length": 12, "temperature": 0.5, "seed": 3}
    status, a = request(fake_server, "POST", "/api/generate", body)
    assert status == 200, a
    assert a["kind"] == "text" and len(a["steps"]) == 12 and len(a["intensity"]) == 12
    assert a["intensity"][2] == pytest.approx([0.2, 1.0, 2.0, 0.5])
    assert a["intensity"][1][3] is None  # NaN is not JSON: sent as null
    status, b = request(fake_server, "POST", "/api/generate", body)
    assert b["steps"] == a["steps"]  # same seed, same sample
    _, c = request(fake_server, "POST", "/api/generate", {**body, "seed": 4})
    assert c["steps"] != a["steps"]
    assert len(fake_server.loads) == 1  # loaded once, then cached


def test_generate_strokes_converts_tensors(fake_server):
    status, data = request(fake_server, "POST", "/api/generate", {"checkpoint": "ink.ckpt", "length": 10})
    assert status == 200, data
    assert data["kind"] == "strokes"
    assert data["steps"][0] == [3.0, 0.0, 1.0] and data["steps"][1] == [3.0, 0.0, 0.0]
    assert len(data["intensity"]) == 10 and all(len(r) == 4 for r in data["intensity"])
    _, listing = request(fake_server, "GET", "/api/checkpoints")
    assert {c["id"]: c["kind"] for c in listing["checkpoints"]}["ink.ckpt"] == "strokes"


def test_stream_sends_each_step_as_it_is_made(tmp_path):
    """The first steps reach the client while the model has not made the later ones: streamed, not replayed."""
    task = GatedTask(before=3)
    server = srv.make_server([_ckpt(tmp_path / "g.ckpt", LM)], port=0, loader=lambda p: task, flush_interval=0).start()
    try:
        conn, resp = open_stream(server, {"checkpoint": "g.ckpt", "length": 8})
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
        events = read_events(resp)
        assert next(events) == ("start", {"checkpoint": "g.ckpt", "kind": "text", "length": 8})
        got = []
        while len(got) < 3:
            name, data = next(events)
            assert name == "steps" and data["t"] == len(got)
            got += data["steps"]
        assert task.made == 3 and not task.gate.is_set()  # the rest is not computed yet
        task.gate.set()
        rest = list(events)
        assert [n for n, _ in rest][-1] == "end" and rest[-1][1]["steps"] == 8
        assert sum(len(d["steps"]) for n, d in rest if n == "steps") == 5
        conn.close()
    finally:
        task.gate.set()
        server.shutdown()


def test_stream_equals_whole_result(fake_server):
    body = {"checkpoint": "char.ckpt", "length": 30, "seed": 5, "prime": "ab"}
    _, whole = request(fake_server, "POST", "/api/generate", body)
    conn, resp = open_stream(fake_server, body)
    events = list(read_events(resp))
    conn.close()
    names = [n for n, _ in events]
    assert names[0] == "start" and names[-1] == "end" and set(names[1:-1]) == {"steps"}
    assert len(names) == 32  # flush_interval=0: one event per step
    steps = [s for n, d in events if n == "steps" for s in d["steps"]]
    intensity = [r for n, d in events if n == "steps" for r in d["intensity"]]
    assert steps == whole["steps"] and intensity == whole["intensity"]


def test_stream_errors_after_start_are_events(fake_server):
    conn, resp = open_stream(fake_server, {"checkpoint": "broken.ckpt", "length": 5})
    events = list(read_events(resp))
    conn.close()
    assert resp.status == 200
    assert [n for n, _ in events] == ["start", "steps", "error"]
    err = events[-1][1]
    assert err["status"] == 500 and "generation failed: RuntimeError" in err["error"]
    assert str(REPO) not in err["error"] and "<path>" in err["error"]  # no absolute paths


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 422, "not valid JSON"),
        (b"\xff\xfe", 422, "not valid JSON"),
        (b'{"checkpoint": "char.ckpt", "temperature": NaN}', 422, "not valid JSON"),
        (b"[1, 2]", 422, "JSON object"),
        (b"[" * 30000 + b"]" * 30000, 422, "not valid JSON: recursion limit"),  # was a 500
        ({"checkpoint": "nope.ckpt"}, 404, 'unknown checkpoint "nope.ckpt"'),
        ({"checkpoint": "../char.ckpt"}, 404, "unknown checkpoint"),
        ({"length": 5}, 422, "checkpoint: Field required"),
        ({"checkpoint": "char.ckpt", "length": -5}, 422, "length: Input should be greater than or equal to 1, got -5"),
        ({"checkpoint": "char.ckpt", "length": 501}, 422, "length: Input should be less than or equal to 500"),
        ({"checkpoint": "char.ckpt", "length": 2.5}, 422, "length: Input should be a valid integer"),
        ({"checkpoint": "char.ckpt", "length": True}, 422, "length: Input should be a valid integer"),
        ({"checkpoint": "char.ckpt", "length": ""}, 422, "got an empty value"),
        ({"checkpoint": "char.ckpt", "temperature": "hot"}, 422, "temperature: Input should be a valid number"),
        ({"checkpoint": "char.ckpt", "temperature": 0}, 422, "temperature: Input should be greater than or equal to 0.01"),
        (b'{"checkpoint": "char.ckpt", "temperature": 1e400}', 422, "temperature: Input should be a finite number"),
        ({"checkpoint": "char.ckpt", "seed": -1}, 422, "seed: Input should be greater than or equal to 0"),
        ({"checkpoint": "char.ckpt", "seed": "x"}, 422, "seed: Input should be a valid integer"),
        ({"checkpoint": "char.ckpt", "prime": 7}, 422, "prime: Input should be a valid string"),
        ({"checkpoint": "char.ckpt", "prime": "x" * 5000}, 422, "prime: String should have at most 1000 characters"),
        ({"checkpoint": "char.ckpt", "lenght": 5}, 422, "lenght: Extra inputs are not permitted"),
        ({"checkpoint": "char.ckpt", "prime": "a~b"}, 400, "outside the vocabulary"),  # the task's ValueError
        ({"checkpoint": "broken.ckpt"}, 500, "generation failed: RuntimeError"),
        ({"checkpoint": "gone.ckpt"}, 500, "could not load checkpoint 'gone.ckpt': FileNotFoundError"),
    ],
)
def test_bad_requests_get_clear_json_errors(fake_server, body, status, words):
    resp, payload = request(fake_server, "POST", "/api/generate", body, raw=True)
    assert resp.status == status, payload
    data = json.loads(payload)
    assert data["status"] == status and words in data["error"], data
    assert "Traceback" not in data["error"]
    assert str(fake_server.root) not in payload.decode()  # no absolute paths, errors included


def test_http_level_errors(fake_server):
    # A huge declared body is refused without waiting for it.
    status, _ = request(fake_server, "POST", "/api/generate", b"{}", headers={"Content-Length": str(10**9)})
    assert status == 413
    status, _ = request(fake_server, "POST", "/api/generate", b" " * (srv.MAX_BODY_BYTES + 1))
    assert status == 413
    assert request(fake_server, "GET", "/api/generate")[0] == 405
    assert request(fake_server, "POST", "/api/checkpoints", b"{}")[0] == 405
    assert request(fake_server, "DELETE", "/api/checkpoints")[0] == 405
    status, data = request(fake_server, "GET", "/api/nothing")
    assert status == 404 and data["error"] == "Not Found"


def test_host_and_origin_checks(tmp_path):
    ck = _ckpt(tmp_path / "a.ckpt", LM)
    server = srv.make_server([ck], port=0, loader=lambda p: FakeTextTask(), allowed_origins=["http://tool.local:9"]).start()
    try:
        port = server.server_address[1]
        body = {"checkpoint": "a.ckpt", "length": 2}
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]"):
            assert request(server, "GET", "/api/checkpoints", headers={"Host": host})[0] == 200, host
        for host in ("evil.example", f"rebind.attacker.example:{port}", "127.0.0.1.nip.io"):
            assert request(server, "GET", "/api/checkpoints", headers={"Host": host})[0] == 400, host
            assert request(server, "POST", "/api/generate", body, headers={"Host": host})[0] == 400, host
        same = {"Origin": f"http://127.0.0.1:{port}"}
        assert request(server, "POST", "/api/generate", body, headers=same)[0] == 200
        assert request(server, "POST", "/api/generate", body, headers={"Origin": "http://tool.local:9"})[0] == 200
        for origin in ("http://evil.example", f"http://localhost:{port + 1}", "null", f"file://127.0.0.1:{port}"):
            status, data = request(server, "POST", "/api/generate", body, headers={"Origin": origin})
            assert status == 403 and "not allowed" in data["error"], origin
    finally:
        server.shutdown()
    # Other names by flag (and '*.' patterns).
    server = srv.make_server([ck], port=0, loader=lambda p: FakeTextTask(), allowed_hosts=["demo.lan", "*.lab"]).start()
    try:
        assert request(server, "GET", "/api/checkpoints", headers={"Host": "demo.lan:8000"})[0] == 200
        assert request(server, "GET", "/api/checkpoints", headers={"Host": "gpu1.lab"})[0] == 200
        assert request(server, "GET", "/api/checkpoints", headers={"Host": "localhost"})[0] == 400
    finally:
        server.shutdown()


def test_full_queue_answers_503_with_retry_after(tmp_path):
    """1 running + 1 waiting: the third request is refused at once; the others finish; a client
    that leaves while waiting gives its place back."""
    task = GatedTask(before=1)
    server = srv.make_server([_ckpt(tmp_path / "g.ckpt", LM)], port=0, loader=lambda p: task,
                             workers=1, queue=1, flush_interval=0).start()
    queue = server.app.state.demo.queue
    body = {"checkpoint": "g.ckpt", "length": 3}
    try:
        c1, r1 = open_stream(server, body)
        e1 = read_events(r1)
        assert next(e1)[0] == "start" and next(e1)[0] == "steps"  # running, stopped at the gate
        c2, r2 = open_stream(server, body)
        e2 = read_events(r2)
        name, data = next(e2)
        assert name == "queued" and data == {"ahead": 0, "running": 1}
        t0 = time.monotonic()
        resp, payload = request(server, "POST", "/api/generate/stream", body, raw=True)
        assert resp.status == 503 and time.monotonic() - t0 < 5
        assert 1 <= int(resp.getheader("Retry-After")) <= 60
        assert "busy" in json.loads(payload)["error"]
        assert request(server, "POST", "/api/generate", body)[0] == 503  # the JSON endpoint shares the queue
        task.gate.set()
        assert [n for n, _ in e1][-1] == "end"
        assert [n for n, _ in e2][-2:] == ["steps", "end"]
        c1.close()
        c2.close()
        deadline = time.monotonic() + 5
        while queue.admitted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.admitted == 0 and queue.running == 0
        # A waiting client that disconnects frees its place.
        task.gate.clear()
        task.before = 0
        c1, r1 = open_stream(server, body)
        assert next(read_events(r1))[0] == "start"
        c2, r2 = open_stream(server, body)
        assert next(read_events(r2))[0] == "queued"
        assert queue.admitted == 2
        c2.sock.shutdown(socket.SHUT_RDWR)
        c2.close()
        deadline = time.monotonic() + 5
        while queue.admitted > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert queue.admitted == 1
        task.gate.set()
        c1.close()
    finally:
        task.gate.set()
        server.shutdown()


class SlowTask:
    demo_kind = "text"

    def __init__(self):
        self.made = 0

    def demo_stream(self, length=200, temperature=1.0, seed=0, prime=""):
        for _ in range(length):
            time.sleep(0.005)
            self.made += 1
            yield "a", [0.0] * 4


def test_client_leaving_mid_stream_stops_the_model_and_frees_the_worker(tmp_path):
    task = SlowTask()
    server = srv.make_server([_ckpt(tmp_path / "s.ckpt", LM)], port=0, loader=lambda p: task, workers=1, queue=0).start()
    queue = server.app.state.demo.queue
    try:
        conn, resp = open_stream(server, {"checkpoint": "s.ckpt", "length": 2000})
        events = read_events(resp)
        assert next(events)[0] == "start" and next(events)[0] == "steps"
        assert queue.running == 1
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 5
        while (queue.running or queue.admitted) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert queue.running == 0 and queue.admitted == 0
        made = task.made
        time.sleep(0.3)
        assert task.made == made < 2000  # the model stopped with the client
        assert request(server, "POST", "/api/generate", {"checkpoint": "s.ckpt", "length": 3})[0] == 200  # worker free
    finally:
        server.shutdown()


def test_static_files_and_traversal(fake_server):
    resp, page = request(fake_server, "GET", "/", raw=True)
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/html")
    assert "default-src 'self'" in resp.getheader("Content-Security-Policy")
    assert b"/static/app.js" in page and b"://" not in page  # no external assets
    for name, ctype in [("app.js", "javascript"), ("style.css", "text/css")]:
        resp, body = request(fake_server, "GET", f"/static/{name}", raw=True)
        assert resp.status == 200 and ctype in resp.getheader("Content-Type") and body
        assert b"://" not in body  # no CDN
    for bad in ["/static/../server.py", "/static/%2e%2e/server.py", "/..%2fserver.py", "/static/..%2F__init__.py",
                "/%2fetc%2fpasswd", "/static//etc/passwd", "/nothing.html"]:
        status, data = request(fake_server, "GET", bad)
        assert status == 404, bad
        assert b"import" not in json.dumps(data).encode()


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert srv.main(["--checkpoints", str(tmp_path / "missing.ckpt"), "--port", "0"]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert srv.main(["--checkpoints", str(tmp_path / "empty")]) == 2
    assert "no *.ckpt" in capsys.readouterr().err
    for flag, value in (("--port", "70000"), ("--workers", "0"), ("--queue", "-1"), ("--max-length", "0")):
        assert srv.main(["--checkpoints", str(tmp_path), flag, value]) == 2
        assert flag in capsys.readouterr().err


def test_duplicate_names_get_distinct_ids(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        _ckpt(tmp_path / d / "last.ckpt", "x.Y")
    entries = srv.find_checkpoints([tmp_path / "a" / "last.ckpt", tmp_path / "b" / "last.ckpt", tmp_path / "a" / "last.ckpt"])
    assert [e.id for e in entries] == ["last.ckpt", "last.ckpt (2)"]


def test_index_rescans_only_on_change(tmp_path):
    """Serving runs/ during training: unchanged folders are not walked again; new checkpoints appear,
    deleted ones give 404, rewritten ones are loaded again."""
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    first = _ckpt(run / "best-step=1.ckpt", LM)
    loads: list[Path] = []
    server = srv.make_server([tmp_path], port=0, loader=lambda p: loads.append(p) or FakeTextTask()).start()
    index = server.app.state.demo.index
    try:
        body = {"checkpoint": "run/checkpoints/best-step=1.ckpt", "length": 3}
        scans = index.scans
        for _ in range(3):
            assert request(server, "POST", "/api/generate", body)[0] == 200
            assert request(server, "GET", "/api/checkpoints")[0] == 200
        assert index.scans == scans  # nothing changed: no walk
        assert len(loads) == 1
        st = first.stat()
        os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # rewritten in place by the trainer
        assert request(server, "POST", "/api/generate", body)[0] == 200
        assert len(loads) == 2
        _ckpt(run / "best-step=2.ckpt", LM)  # a new file two folders down
        first.unlink()
        _, listing = request(server, "GET", "/api/checkpoints")
        assert [c["id"] for c in listing["checkpoints"]] == ["run/checkpoints/best-step=2.ckpt"]
        assert index.scans == scans + 1
        status, data = request(server, "POST", "/api/generate", body)
        assert status == 404 and "unknown checkpoint" in data["error"]
        # A new file is found without listing first.
        _ckpt(run / "best-step=3.ckpt", LM)
        assert request(server, "POST", "/api/generate", {**body, "checkpoint": "run/checkpoints/best-step=3.ckpt"})[0] == 200
        (tmp_path / "run2").mkdir()  # a new run folder
        _ckpt(tmp_path / "run2" / "last.ckpt", HW)
        _, listing = request(server, "GET", "/api/checkpoints")
        assert "run2/last.ckpt" in [c["id"] for c in listing["checkpoints"]]
    finally:
        server.shutdown()


def test_directories_skip_models_without_a_demo(tmp_path):
    _ckpt(tmp_path / "mnist.ckpt", "hypernetworks.tasks.classification.ImageClassifier")
    _ckpt(tmp_path / "ink.ckpt", HW)
    assert [e.id for e in srv.find_checkpoints([tmp_path])] == ["ink.ckpt"]
    # A file named explicitly is listed (and refused with a message when asked to generate).
    assert [e.id for e in srv.find_checkpoints([tmp_path / "mnist.ckpt"])] == ["mnist.ckpt"]
    (tmp_path / "ink.ckpt").unlink()
    with pytest.raises(ValueError, match="holds a text or handwriting model"):
        srv.find_checkpoints([tmp_path])


def test_load_test_fast(tmp_path):
    """The load test's fast version: 50 simultaneous generate requests on their own connections,
    zero connection errors, each answered 200 or 503 (benchmarks/serve_load.py is the full one)."""
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    server = srv.make_server([_ckpt(tmp_path / "a.ckpt", LM)], port=0, loader=lambda p: FakeTextTask(),
                             workers=1, queue=8).start()
    try:
        results = serve_load.burst(server.url, {"checkpoint": "a.ckpt", "length": 50}, n=50, timeout=30)
    finally:
        server.shutdown()
    summary = serve_load.summarize(results)
    assert summary["errors"] == 0, summary
    assert summary["status"].keys() <= {200, 503} and sum(summary["status"].values()) == 50
    assert summary["status"].get(200, 0) >= 9  # 1 running + 8 waiting are always served
    assert all(r["retry_after"] for r in results if r["status"] == 503)


# ----------------------------------------------------------------------------- task streaming contract
VOCAB = list("abcdefgh \n")


def _jiggle(module: torch.nn.Module) -> None:
    with torch.no_grad():  # at initialisation z (so d) is constant: move off it, as training does
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("prime", ["", "a", "abc"])
def test_char_lm_stream_matches_reference(prime):
    """demo_stream's per-step intensity equals gate_change_intensity over the whole recorded d_h."""
    from hypernetworks.nn import gate_change_intensity
    from hypernetworks.tasks.language_model import LanguageModelTask

    torch.manual_seed(0)
    task = LanguageModelTask(cell="hyperlstm", hidden_size=16, hyper_size=8, vocab=VOCAB)
    _jiggle(task)
    out, d_hs = task._generate(20, 0.8, 1, prime, activity=True)
    seq = torch.stack([d[-1] for d in d_hs])
    ref = gate_change_intensity(seq, d_hs[0][-2] if d_hs[0].shape[0] > 1 else None)
    items = list(task.demo_stream(20, 0.8, 1, prime))
    assert [c for c, _ in items] == [VOCAB[i] for i in out]
    torch.testing.assert_close(torch.tensor([i for _, i in items]), ref)
    assert task.sample(20, 0.8, 1, prime) == "".join(c for c, _ in items)


def test_handwriting_stream_matches_generate():
    from hypernetworks.tasks.handwriting import HandwritingTask

    torch.manual_seed(0)
    for name in ("iam-hyperlstm-900", "iam-lstm-900"):
        task = HandwritingTask(name, model_overrides={"hidden_size": 12, "hyper_size": 6, "embedding_size": 2,
                                                      "num_mixtures": 3})
        _jiggle(task)
        task.offset_mean.fill_(0.5)
        task.offset_std.fill_(2.0)
        steps, intensity = task.generate(30, temperature=0.8, seed=3, activity=True)
        items = list(task.demo_stream(30, 0.8, 3))
        assert torch.equal(torch.tensor([s for s, _ in items]), steps)
        got = torch.tensor([i for _, i in items])
        if intensity is None:
            assert not got.any()
        else:
            torch.testing.assert_close(got, intensity)


def test_streams_compute_lazily_and_check_arguments_at_once():
    from hypernetworks.tasks.handwriting import HandwritingTask
    from hypernetworks.tasks.language_model import LanguageModelTask

    lm = LanguageModelTask(cell="hyperlstm", hidden_size=16, hyper_size=8, vocab=VOCAB)
    hw = HandwritingTask("iam-hyperlstm-900", model_overrides={"hidden_size": 12, "hyper_size": 6,
                                                                "embedding_size": 2, "num_mixtures": 3})
    for task, net in ((lm, lm.net), (hw, hw.model)):
        calls = []
        real = net.forward_with_activity
        net.forward_with_activity = lambda *a, **k: calls.append(1) or real(*a, **k)  # count model steps
        try:
            task.train()
            stream = task.demo_stream(length=50, temperature=1.0, seed=0)
            assert calls == []
            next(stream), next(stream), next(stream)
            assert len(calls) == 3 and not task.training  # one model step per item
            stream.close()
            assert task.training  # mode restored when the client leaves early
        finally:
            del net.forward_with_activity
        with pytest.raises(ValueError, match="temperature"):
            task.demo_stream(length=5, temperature=0)  # at the call, before any step
    with pytest.raises(ValueError, match="vocabulary"):
        lm.demo_stream(length=5, prime="~")


# ----------------------------------------------------------------------------- real checkpoint
@pytest.fixture(scope="module")
def char_lm_run(tmp_path_factory) -> Path:
    """Two optimiser steps of a tiny character HyperLSTM on the pydoc text, through the real CLI."""
    import sys
    from unittest import mock

    from hypernetworks.training import run_cli

    root = tmp_path_factory.mktemp("runs")
    with mock.patch.object(sys, "argv", ["hypernetworks"]):
        run_cli(["fit", "--config", str(REPO / "configs" / "pydoc-hyperlstm.yaml"), "--runs_root", str(root),
                 "--run_name", "chars", "--model.hidden_size", "24", "--model.hyper_size", "8",
                 "--model.embedding_size", "2", "--data.batch_size", "4", "--data.seq_len", "16",
                 "--data.eval_batch_size", "4", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2",
                 "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    return root


def test_real_checkpoint_through_load_task(char_lm_run):
    server = srv.make_server([str(char_lm_run)], port=0).start()  # the default loader: hypernetworks.training.load_task
    try:
        _, listing = request(server, "GET", "/api/checkpoints")
        ids = [c["id"] for c in listing["checkpoints"]]
        assert "chars/checkpoints/last.ckpt" in ids
        assert {c["kind"] for c in listing["checkpoints"]} == {"text"}  # read from the stored class path
        body = {"checkpoint": "chars/checkpoints/last.ckpt", "length": 25, "temperature": 1.0, "seed": 1, "prime": "def "}
        status, a = request(server, "POST", "/api/generate", body)
        assert status == 200, a
        assert a["kind"] == "text" and len(a["steps"]) == 25 and all(isinstance(c, str) for c in a["steps"])
        assert len(a["intensity"]) == 25 and all(len(r) == 4 for r in a["intensity"])
        assert any(v > 0 for r in a["intensity"] for v in r)  # a HyperLSTM's weights do change
        conn, resp = open_stream(server, body)
        events = list(read_events(resp))
        conn.close()
        assert [s for n, d in events if n == "steps" for s in d["steps"]] == a["steps"]  # deterministic under seed
    finally:
        server.shutdown()

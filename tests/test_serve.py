"""The demo server's JSON API over real HTTP (no browser): listing, generation, validation, static files.

Tasks here are small fakes that follow the demo-page contract (``demo_generate``); the end-to-end
tests with real checkpoints are in test_serve_browser.py and at the end of this file.
"""
from __future__ import annotations

import http.client
import os
import json
import threading
from pathlib import Path

import pytest
import torch

from hypernetworks.serve import server as srv


class FakeTextTask:
    """Deterministic under seed; intensity follows a known pattern so tests can check it is passed through."""

    def __init__(self):
        self.calls = 0

    def demo_generate(self, length=200, temperature=1.0, seed=0, prime=""):
        self.calls += 1
        if "~" in prime:
            raise ValueError("prime contains characters outside the vocabulary: '~'")
        g = torch.Generator().manual_seed(seed)
        chars = [chr(ord("a") + int(i)) for i in torch.randint(0, 26, (length,), generator=g)]
        return {"kind": "text", "steps": chars,
                "intensity": [[t * 0.1, 1.0, 2.0, float("nan") if t == 1 else 0.5] for t in range(length)]}


class FakeStrokeTask:
    def demo_generate(self, length=200, temperature=1.0, seed=0, prime=""):
        steps = torch.zeros(length, 3)
        steps[:, 0] = 3.0
        steps[::5, 2] = 1
        return {"kind": "strokes", "steps": steps, "intensity": torch.rand(length, 4)}  # tensors: server converts


class BrokenTask:
    def demo_generate(self, **kw):
        raise RuntimeError("secret internal detail")


def _ckpt(path: Path, class_path: str) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": class_path}}, path)
    return path


@pytest.fixture()
def fake_server(tmp_path):
    text = _ckpt(tmp_path / "char.ckpt", "hypernetworks.tasks.language_model.CharLMTask")
    sub = tmp_path / "hw"
    sub.mkdir()
    ink = _ckpt(sub / "ink.ckpt", "hypernetworks.tasks.handwriting.HandwritingTask")
    broken = _ckpt(tmp_path / "broken.ckpt", "somewhere.Else")
    missing = _ckpt(tmp_path / "gone.ckpt", "x.Y")
    tasks = {text: FakeTextTask(), ink: FakeStrokeTask(), broken: BrokenTask()}
    loads: list[Path] = []

    def loader(path):
        loads.append(path)
        if path == missing.resolve():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return tasks[path]

    server = srv.make_server([str(text), str(sub), str(broken), str(missing)], port=0, loader=loader, max_length=500)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    server.loads = loads
    server.tasks = tasks
    yield server
    server.shutdown()
    server.server_close()


def request(server, method, path, body=None, headers=None, raw=False):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    if raw:
        return resp, payload
    return resp.status, (json.loads(payload) if resp.getheader("Content-Type", "").startswith("application/json") else payload)


def test_binds_loopback_by_default(tmp_path):
    args = srv.build_parser().parse_args(["--checkpoints", "x.ckpt"])
    assert args.host == "127.0.0.1" and args.port == 8000
    server = srv.make_server([_ckpt(tmp_path / "a.ckpt", "x.Y")], port=0, loader=lambda p: FakeTextTask())
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_lists_checkpoints_with_kind(fake_server):
    status, data = request(fake_server, "GET", "/api/checkpoints")
    assert status == 200
    kinds = {c["id"]: c["kind"] for c in data["checkpoints"]}
    assert kinds == {"char.ckpt": "text", "ink.ckpt": "strokes", "broken.ckpt": "unknown", "gone.ckpt": "unknown"}
    assert data["limits"]["length"] == [1, 500]
    assert fake_server.loads == []  # listing does not load models


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


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b'{"checkpoint": "char.ckpt", "temperature": NaN}', 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"checkpoint": "nope.ckpt"}, 404, "unknown checkpoint 'nope.ckpt'"),
        ({"checkpoint": "../char.ckpt"}, 404, "unknown checkpoint"),
        ({"length": 5}, 400, "checkpoint must be"),
        ({"checkpoint": "char.ckpt", "length": -5}, 400, "length must be between 1 and 500, got -5"),
        ({"checkpoint": "char.ckpt", "length": 501}, 400, "length must be between 1 and 500"),
        ({"checkpoint": "char.ckpt", "length": 2.5}, 400, "length must be an integer"),
        ({"checkpoint": "char.ckpt", "length": True}, 400, "length must be an integer"),
        ({"checkpoint": "char.ckpt", "length": ""}, 400, "length must be an integer"),
        ({"checkpoint": "char.ckpt", "temperature": "hot"}, 400, "temperature must be a number"),
        ({"checkpoint": "char.ckpt", "temperature": 0}, 400, "temperature must be between"),
        ({"checkpoint": "char.ckpt", "seed": -1}, 400, "seed must be between"),
        ({"checkpoint": "char.ckpt", "seed": "x"}, 400, "seed must be an integer"),
        ({"checkpoint": "char.ckpt", "prime": 7}, 400, "prime must be a string"),
        ({"checkpoint": "char.ckpt", "prime": "x" * 5000}, 400, "at most"),
        ({"checkpoint": "char.ckpt", "lenght": 5}, 400, "unknown field(s): lenght"),
        ({"checkpoint": "char.ckpt", "prime": "a~b"}, 400, "outside the vocabulary"),  # the task's ValueError
        ({"checkpoint": "broken.ckpt"}, 500, "generation failed: RuntimeError"),
        ({"checkpoint": "gone.ckpt"}, 500, "could not load checkpoint 'gone.ckpt'"),
    ],
)
def test_bad_requests_get_clear_json_errors(fake_server, body, status, words):
    got, data = request(fake_server, "POST", "/api/generate", body)
    assert got == status
    assert isinstance(data, dict) and words in data["error"]
    assert "Traceback" not in data["error"]


def test_http_level_errors(fake_server):
    host, port = fake_server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/api/generate")
    conn.endheaders()  # no Content-Length
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    conn.close()
    # A huge declared body is refused without waiting for it.
    status, data = request(fake_server, "POST", "/api/generate", b"{}", headers={"Content-Length": str(10**9)})
    assert status == 413 and "too large" in data["error"]
    assert request(fake_server, "GET", "/api/generate")[0] == 405
    assert request(fake_server, "POST", "/api/checkpoints", b"{}")[0] == 405
    assert request(fake_server, "DELETE", "/api/checkpoints")[0] == 405
    status, data = request(fake_server, "GET", "/api/nothing")
    assert status == 404 and "no API endpoint" in data["error"]


def test_static_files_and_traversal(fake_server):
    resp, page = request(fake_server, "GET", "/", raw=True)
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/html")
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
    assert srv.main(["--checkpoints", str(tmp_path), "--port", "70000"]) == 2


def test_duplicate_names_get_distinct_ids(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        _ckpt(tmp_path / d / "last.ckpt", "x.Y")
    entries = srv.find_checkpoints([tmp_path / "a" / "last.ckpt", tmp_path / "b" / "last.ckpt", tmp_path / "a" / "last.ckpt"])
    assert [e.id for e in entries] == ["last.ckpt", "last.ckpt (2)"]


def test_rescans_and_reloads_while_training(tmp_path):
    """Serving runs/ during training: new checkpoints appear, deleted ones give 404, rewritten ones reload."""
    run = tmp_path / "run"
    run.mkdir()
    first = _ckpt(run / "best-step=1.ckpt", "hypernetworks.tasks.language_model.LanguageModelTask")
    loads: list[Path] = []
    server = srv.make_server([tmp_path], port=0, loader=lambda p: loads.append(p) or FakeTextTask())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        body = {"checkpoint": "run/best-step=1.ckpt", "length": 3}
        assert request(server, "POST", "/api/generate", body)[0] == 200
        assert request(server, "POST", "/api/generate", body)[0] == 200
        assert len(loads) == 1
        os.utime(first, (first.stat().st_atime, first.stat().st_mtime + 5))  # rewritten by the trainer
        assert request(server, "POST", "/api/generate", body)[0] == 200
        assert len(loads) == 2
        _ckpt(run / "best-step=2.ckpt", "hypernetworks.tasks.language_model.LanguageModelTask")
        first.unlink()
        _, listing = request(server, "GET", "/api/checkpoints")
        assert [c["id"] for c in listing["checkpoints"]] == ["run/best-step=2.ckpt"]
        status, data = request(server, "POST", "/api/generate", body)
        assert status == 404 and "unknown checkpoint" in data["error"]
        (run / "best-step=2.ckpt").unlink()  # deleted after the last listing
        status, data = request(server, "POST", "/api/generate", {**body, "checkpoint": "run/best-step=2.ckpt"})
        assert status == 404 and "no longer exists" in data["error"]
        # A new file is found even without listing first.
        _ckpt(run / "best-step=3.ckpt", "hypernetworks.tasks.language_model.LanguageModelTask")
        assert request(server, "POST", "/api/generate", {**body, "checkpoint": "run/best-step=3.ckpt"})[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_directories_skip_models_without_a_demo(tmp_path):
    _ckpt(tmp_path / "mnist.ckpt", "hypernetworks.tasks.classification.ImageClassifier")
    _ckpt(tmp_path / "ink.ckpt", "hypernetworks.tasks.handwriting.HandwritingTask")
    assert [e.id for e in srv.find_checkpoints([tmp_path])] == ["ink.ckpt"]
    # A file named explicitly is listed (and refused with a message when asked to generate).
    assert [e.id for e in srv.find_checkpoints([tmp_path / "mnist.ckpt"])] == ["mnist.ckpt"]
    (tmp_path / "ink.ckpt").unlink()
    with pytest.raises(ValueError, match="holds a text or handwriting model"):
        srv.find_checkpoints([tmp_path])


# ----------------------------------------------------------------------------- real checkpoint
@pytest.fixture(scope="module")
def char_lm_run(tmp_path_factory) -> Path:
    """Two optimiser steps of a tiny character HyperLSTM on the pydoc text, through the real CLI."""
    import sys
    from unittest import mock

    from hypernetworks.training import run_cli

    root = tmp_path_factory.mktemp("runs")
    repo = Path(__file__).resolve().parents[1]
    with mock.patch.object(sys, "argv", ["hypernetworks"]):
        run_cli(["fit", "--config", str(repo / "configs" / "pydoc-hyperlstm.yaml"), "--runs_root", str(root),
                 "--run_name", "chars", "--model.hidden_size", "24", "--model.hyper_size", "8",
                 "--model.embedding_size", "2", "--data.batch_size", "4", "--data.seq_len", "16",
                 "--data.eval_batch_size", "4", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2",
                 "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    return root


def test_real_checkpoint_through_load_task(char_lm_run):
    server = srv.make_server([str(char_lm_run)], port=0)  # the default loader: hypernetworks.training.load_task
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
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
        assert request(server, "POST", "/api/generate", body)[1]["steps"] == a["steps"]  # deterministic under seed
    finally:
        server.shutdown()
        server.server_close()

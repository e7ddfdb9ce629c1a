"""End to end: real tiny checkpoints, the demo server, and its page in headless Chromium.

The page must show the sample while it is being generated: the tests record the page's step count
and state on every change and check that partial samples were on screen before the end.

Uses Debian's Chromium (/usr/bin/chromium; ``apt-get install chromium``) driven by the
``playwright`` Python package; Playwright's own browser download is never used. Skipped with a
reason when either is missing.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from hypernetworks.serve import server as srv

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("HYPERNETWORKS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[1]
TINY = ["--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "2"]


def _train(args: list[str]) -> None:
    """A couple of optimiser steps through the project's real training entry point (LightningCLI)."""
    from hypernetworks.training import run_cli

    with mock.patch.object(sys, "argv", ["hypernetworks"]):  # pytest's own arguments are not the CLI's
        run_cli(["fit", *args, *TINY])


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"the browser test needs Chromium, not found at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Paced:
    """A loaded task whose stream waits ``delay`` seconds after each real model step, so that
    "steps arrive before the end" is observable however fast the machine is."""

    def __init__(self, task, delay: float = 0.01):
        self.task, self.delay = task, delay
        self.demo_kind = task.demo_kind

    def demo_stream(self, **kw):
        items = self.task.demo_stream(**kw)  # arguments checked now, as the real task does

        def paced():
            for item in items:
                yield item
                time.sleep(self.delay)

        return paced()


def _serve(root: Path):
    from hypernetworks.training import load_task

    # The real loader (load_task) and the real models, paced; one event per step.
    server = srv.make_server([str(root)], port=0, max_length=400, flush_interval=0,
                             loader=lambda p: Paced(load_task(p, map_location="cpu"))).start()
    return server


@pytest.fixture(scope="module")
def text_server(browser, tmp_path_factory):
    """A tiny character HyperLSTM (pydoc text: no dataset needed) behind a live server."""
    root = tmp_path_factory.mktemp("runs")
    _train(["--config", str(REPO / "configs" / "pydoc-hyperlstm.yaml"), "--runs_root", str(root), "--run_name", "chars",
            "--model.hidden_size", "24", "--model.hyper_size", "8", "--model.embedding_size", "2",
            "--data.batch_size", "4", "--data.seq_len", "16", "--data.eval_batch_size", "4"])
    server = _serve(root)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def handwriting_server(browser, tmp_path_factory, shared_data):
    """A tiny handwriting HyperLSTM (4 IAM-OnDB lines) behind a live server."""
    npz = shared_data / "iam_ondb" / "iam_ondb_linestrokes.npz"
    if not npz.exists():
        pytest.skip(f"needs the IAM-OnDB file {npz}; point HYPERNETWORKS_DATA at a data folder that has it "
                    "(README, Testing)")
    root = tmp_path_factory.mktemp("runs")
    _train(["--config", str(REPO / "configs" / "iam-hyperlstm-900.yaml"), "--runs_root", str(root),
            "--run_name", "handwriting", "--data.path", str(npz), "--data.batch_size", "2",
            "--data.max_lines", "4", "--data.max_val_lines", "2", "--data.max_len", "40",
            "--model.model_overrides", "{hidden_size: 24, hyper_size: 8, embedding_size: 2, num_mixtures: 3}"])
    server = _serve(root)
    yield server
    server.shutdown()


INK_PIXELS = """(id) => {
  const c = document.getElementById(id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let k = 3; k < d.length; k += 4) if (d[k] > 0) n++;
  return n;
}"""

# Records, on every change of the output's step count or state, (steps, state, characters of text
# on screen, points in the traces): the sample seen growing while the state is still "streaming".
WATCH = """() => {
  window.__seen = [];
  const out = document.getElementById('output'), text = document.getElementById('text-output');
  const traces = document.getElementById('traces');
  const note = () => window.__seen.push([Number(out.dataset.steps), out.dataset.state,
                                         text.textContent.length, Number(traces.dataset.points)]);
  new MutationObserver(note).observe(out, {attributes: true, attributeFilter: ['data-steps', 'data-state']});
  new MutationObserver(note).observe(traces, {attributes: true, attributeFilter: ['data-points']});
}"""


def _check_streamed(seen, total):
    """Steps were on screen, and the traces drawn, while the generation was still running."""
    partial = [s for s in seen if s[1] == "streaming" and 0 < s[0] < total]
    assert len({s[0] for s in partial}) >= 5, seen  # many partial states, not one jump to the end
    assert any(0 < s[3] < total for s in partial), seen  # traces drawn part way
    done = [i for i, s in enumerate(seen) if s[1] == "done"]
    assert done and all(s[1] != "done" for s in seen[:done[0]]) and seen[done[0]][0] == total, seen
    counts = [s[0] for s in seen if s[1] == "streaming"]
    assert counts == sorted(counts), counts


# Predicates are passed as functions ("() => ..."): Playwright evaluates a bare expression string
# with eval, which the page's Content-Security-Policy (no 'unsafe-eval') rightly refuses.
def _open(browser, url):
    """A page on the demo, with the checkpoint list loaded; records script errors and outside requests."""
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.errors, page.external = [], []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith(url) else page.external.append(r.url))
    page.goto(url)
    page.wait_for_selector("#generate:not([disabled])", timeout=15000)
    options = page.eval_on_selector_all("#checkpoint option", "os => Object.fromEntries(os.map(o => [o.value, o.textContent]))")
    return page, options


def _done(page):
    assert not page.errors, page.errors
    assert not page.external, page.external  # no CDN, nothing beyond the local server
    page.close()


def test_text_page_streams_and_shows_errors(browser, text_server):
    page, options = _open(browser, text_server.url)
    assert options and all(k.startswith("chars/") and "[text]" in v for k, v in options.items()), options
    ckpt = "chars/checkpoints/last.ckpt"
    page.select_option("#checkpoint", ckpt)

    # Generate text after a prime: the characters appear as the model makes them, coloured by
    # weight change, and the traces grow with them.
    assert page.is_visible("#prime")
    page.fill("#prime", "The ")
    page.fill("#length", "60")
    page.evaluate(WATCH)
    page.click("#generate")
    page.wait_for_selector("#output[data-state=done]", timeout=60000)
    seen = page.evaluate("window.__seen")
    _check_streamed(seen, 60)
    assert any(s[1] == "streaming" and 4 < s[2] < 4 + 60 for s in seen), seen  # partial text on screen
    assert page.get_attribute("#output", "data-kind") == "text"
    assert page.is_visible("#text-output") and not page.is_visible("#ink")
    text = page.text_content("#text-output")
    assert text.startswith("The ") and len(text) == 4 + 60
    assert page.eval_on_selector_all("#text-output span.step[style]", "s => s.length") == 60
    assert page.get_attribute("#traces", "data-points") == "60"
    assert page.evaluate(INK_PIXELS, "traces") > 500
    assert page.is_hidden("#trace-note") and page.is_hidden("#message")
    assert "60 steps in" in page.text_content("#progress")
    if os.environ.get("HYPERNETWORKS_SCREENSHOT_DIR"):  # for looking at the page while working on it
        page.screenshot(path=str(Path(os.environ["HYPERNETWORKS_SCREENSHOT_DIR"]) / "serve-text.png"), full_page=True)

    # Stop part way: what arrived stays, the server's queue place is given back.
    page.fill("#length", "400")
    page.click("#generate")
    page.wait_for_function("() => Number(document.getElementById('output').dataset.steps) >= 10", timeout=30000)
    assert page.text_content("#generate") == "Stop"
    page.click("#generate")
    page.wait_for_selector("#output[data-state=stopped]", timeout=15000)
    stopped_at = int(page.get_attribute("#output", "data-steps"))
    assert 10 <= stopped_at < 400 and "stopped at step" in page.text_content("#progress")
    assert page.text_content("#generate") == "Generate"
    queue = text_server.app.state.demo.queue
    deadline = time.monotonic() + 10
    while (queue.admitted or queue.running) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue.admitted == 0 and queue.running == 0

    # A bad request from the page's own controls: a clear message, the button usable again.
    page.fill("#length", "-5")
    page.click("#generate")
    page.wait_for_selector("#message.error", timeout=15000)
    assert "length: Input should be greater than or equal to 1, got -5" in page.text_content("#message")
    assert page.get_attribute("#output", "data-state") == "error"
    assert page.is_enabled("#generate")

    # An empty number field: the server's message names it.
    page.fill("#length", "10")
    page.fill("#temperature", "")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('temperature')", timeout=15000)
    assert "temperature: Input should be a valid number, got an empty value" in page.text_content("#message")
    page.fill("#temperature", "1")

    # An unknown checkpoint (e.g. the server restarted with other files).
    page.evaluate("() => document.getElementById('checkpoint').add(new Option('gone', 'gone.ckpt', true, true))")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('unknown checkpoint')", timeout=15000)
    assert page.is_visible("#message.error")
    # ... after which the page fetches the current list again.
    page.wait_for_function("() => !document.querySelector('#checkpoint option[value=\"gone.ckpt\"]')", timeout=15000)
    assert "unknown checkpoint" in page.text_content("#message")

    # Recovers: a good request clears the message.
    page.select_option("#checkpoint", ckpt)
    page.click("#generate")
    page.wait_for_selector("#output[data-state=done]", timeout=60000)
    assert page.is_hidden("#message")
    assert page.get_attribute("#output", "data-steps") == "10"
    _done(page)


def test_handwriting_page_streams_strokes_and_traces(browser, handwriting_server):
    page, options = _open(browser, handwriting_server.url)
    assert options and all("[handwriting]" in v for v in options.values()), options
    page.select_option("#checkpoint", "handwriting/checkpoints/last.ckpt")
    assert page.is_hidden("#prime")  # handwriting is unconditional
    page.fill("#length", "120")
    page.evaluate(WATCH)
    page.click("#generate")
    # Ink is on the canvas while the model is still writing.
    page.wait_for_function("() => document.getElementById('output').dataset.state === 'streaming' && "
                           "Number(document.getElementById('output').dataset.steps) >= 30", timeout=60000)
    if page.get_attribute("#output", "data-state") == "streaming":
        assert page.evaluate(INK_PIXELS, "ink") > 50
    page.wait_for_selector("#output[data-state=done]", timeout=60000)
    _check_streamed(page.evaluate("window.__seen"), 120)
    assert page.get_attribute("#output", "data-kind") == "strokes"
    assert page.get_attribute("#output", "data-steps") == "120"
    assert page.is_visible("#ink") and not page.is_visible("#text-output")
    assert page.evaluate(INK_PIXELS, "ink") > 200  # strokes were drawn
    assert page.evaluate(INK_PIXELS, "traces") > 500
    assert page.is_hidden("#trace-note")  # a HyperLSTM: the intensities are not all zero
    if os.environ.get("HYPERNETWORKS_SCREENSHOT_DIR"):  # for looking at the page while working on it
        page.screenshot(path=str(Path(os.environ["HYPERNETWORKS_SCREENSHOT_DIR"]) / "serve-handwriting.png"), full_page=True)
    _done(page)

"""Screenshot of the demo page while a sample streams (how docs/serve.png was made).

Serves one checkpoint on a free loopback port, opens the page in headless Debian Chromium through
Playwright, asks for a sample and takes the picture once ``--at`` steps are on screen. ``--pace``
makes the server wait that many seconds after each real model step, so that a fast model can be
caught part way (0: the model's own speed).

    python benchmarks/serve_screenshot.py --checkpoint runs/pydoc-hyperlstm/checkpoints/last.ckpt \\
        --out docs/serve.png --prime "The " --length 400 --at 200 --pace 0.01
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from hypernetworks.serve import server as srv  # noqa: E402
from hypernetworks.training import load_task  # noqa: E402


class Paced:
    """A loaded task whose stream waits ``delay`` seconds after each real model step."""

    def __init__(self, task, delay: float):
        self.task, self.delay, self.demo_kind = task, delay, task.demo_kind

    def demo_stream(self, **kw):
        items = self.task.demo_stream(**kw)

        def paced():
            for item in items:
                yield item
                time.sleep(self.delay)

        return paced()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prime", default="")
    p.add_argument("--length", type=int, default=400)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--at", type=int, default=200, help="take the picture once this many steps are on screen")
    p.add_argument("--pace", type=float, default=0.01, help="seconds to wait after each model step")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    server = srv.make_server([args.checkpoint], port=0, max_length=max(args.length, 1),
                             loader=lambda path: Paced(load_task(path, map_location="cpu"), args.pace)).start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server.url)
            page.wait_for_selector("#generate:not([disabled])")
            page.fill("#prime", args.prime)
            page.fill("#length", str(args.length))
            page.fill("#temperature", str(args.temperature))
            page.fill("#seed", str(args.seed))
            page.click("#generate")
            page.wait_for_function(f"() => Number(document.getElementById('output').dataset.steps) >= {args.at}",
                                   timeout=120000)
            page.screenshot(path=str(args.out), full_page=True)
            print(f"{args.out}: state {page.get_attribute('#output', 'data-state')}, "
                  f"{page.get_attribute('#output', 'data-steps')} steps on screen")
            browser.close()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

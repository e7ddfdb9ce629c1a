"""Load test of ``hypernetworks serve``: a burst of simultaneous generate requests on loopback.

Starts the real CLI server (``python -m hypernetworks.cli serve``) in a child process on a free
127.0.0.1 port, sends ``--requests`` generate requests at the same instant, each on its own TCP
connection from its own thread, and reports: connection errors (resets, refusals, timeouts), the
HTTP statuses (the server must answer each one 200 or 503 + Retry-After), and latency percentiles.
Without ``--checkpoint`` it first trains a tiny character HyperLSTM for 2 steps on the pydoc text
(no download). Loopback only; bounded by ``--requests`` and by ``--timeout`` seconds per request.

``--flood N`` adds a slow-header flood: N connections from another loopback address
(``--flood-source``, default 127.0.0.2) that send a request's headers one byte every ``--drip``
seconds and never finish them, reconnecting whenever the server closes one. The burst starts
``--flood-settle`` seconds into the flood, from 127.0.0.1, and the flood runs until it ends; the
report adds what the server did to the flood's connections (408 after the header timeout, 429
past the per-address cap, 503 past the total cap). ``--server-arg`` passes options to the server
(for instance the connection limits, to compare).

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --requests 50 --length 100
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --checkpoint runs/x/checkpoints/last.ckpt --endpoint stream
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --requests 50 --length 100 --flood 500
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]


def _one(url: str, path: str, body: bytes, timeout: float, barrier: threading.Barrier, out: dict) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.connect()  # connect first, so the burst is 50 requests at once, not 50 handshakes
        barrier.wait(timeout)
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out["status"] = resp.status
        out["retry_after"] = resp.getheader("Retry-After")
        if resp.status == 200 and path.endswith("/stream"):
            while line := resp.readline():  # time to the first streamed steps, then to the end
                if line.startswith(b"event: steps") and "first_step_s" not in out:
                    out["first_step_s"] = time.perf_counter() - t0
                elif line.startswith(b"event: error"):
                    out["stream_error"] = True
        else:
            resp.read()
        out["latency_s"] = time.perf_counter() - t0
    except Exception as e:  # a reset, refusal or timeout: what this test exists to count
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def burst(url: str, body: dict, n: int = 50, timeout: float = 120.0, endpoint: str = "json") -> list[dict]:
    """``n`` simultaneous POSTs to /api/generate (``endpoint="json"``) or /api/generate/stream;
    one dict per request: status, latency_s, retry_after, first_step_s (stream), error."""
    path = "/api/generate/stream" if endpoint == "stream" else "/api/generate"
    data = json.dumps(body).encode()
    barrier = threading.Barrier(n)
    results: list[dict] = [{} for _ in range(n)]
    threads = [threading.Thread(target=_one, args=(url, path, data, timeout, barrier, results[i]), daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    for r in results:
        r.setdefault("status", None)
        if r["status"] is None:
            r.setdefault("error", "no answer")
    return results


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def summarize(results: list[dict]) -> dict:
    status: dict[int, int] = {}
    for r in results:
        if r.get("status") is not None:
            status[r["status"]] = status.get(r["status"], 0) + 1
    ok = [r["latency_s"] for r in results if r.get("status") == 200]
    busy = [r["latency_s"] for r in results if r.get("status") == 503]
    first = [r["first_step_s"] for r in results if "first_step_s" in r]
    return {
        "requests": len(results),
        "errors": sum("error" in r for r in results),
        "error_examples": sorted({r["error"] for r in results if "error" in r})[:3],
        "stream_errors": sum(bool(r.get("stream_error")) for r in results),
        "status": status,
        "p50_200_s": _pct(ok, 50), "p95_200_s": _pct(ok, 95), "max_200_s": max(ok) if ok else None,
        "p50_503_s": _pct(busy, 50), "p95_503_s": _pct(busy, 95),
        "p50_first_step_s": _pct(first, 50), "p95_first_step_s": _pct(first, 95),
        "p50_all_s": _pct(ok + busy, 50), "p95_all_s": _pct(ok + busy, 95),
    }


class SlowHeaderFlood:
    """``n`` connections from ``source`` that each send ``GET / HTTP/1.1`` and then their headers
    one byte every ``drip`` seconds, never finishing them; a connection the server closes is
    opened again after ``drip`` seconds. Runs an event loop in a thread: ``start()``, ``stop()``."""

    def __init__(self, url: str, n: int, source: str = "127.0.0.2", drip: float = 1.0):
        parts = urlsplit(url)
        self.host, self.port, self.n, self.source, self.drip = parts.hostname, parts.port, n, source, drip
        self.counts: collections.Counter = collections.Counter()  # opened, answers by status, errors
        self.open_now = 0
        self.max_open = 0
        self.open_samples: list[int] = []
        self.sampling = False  # while True, the number of open flood connections is sampled every 50 ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> "SlowHeaderFlood":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(30)
        return self.summary()

    def summary(self) -> dict:
        return {"connections": self.n, "source": self.source, "drip_s": self.drip,
                "opened": self.counts["opened"], "max_open": self.max_open,
                "open_during_burst": (min(self.open_samples), max(self.open_samples)) if self.open_samples else None,
                "closed_by_server": {k: v for k, v in sorted(self.counts.items()) if k not in ("opened",)}}

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._one(i)) for i in range(self.n)]
        while not self._stop.is_set():
            await asyncio.sleep(0.05)
            if self.sampling:
                self.open_samples.append(self.open_now)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, i: int) -> None:
        await asyncio.sleep(i * 0.002)  # spread the connects a little
        request = b"GET /api/checkpoints HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100000
        while not self._stop.is_set():
            writer = None
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port, local_addr=(self.source, 0))
                self.counts["opened"] += 1
                self.open_now += 1
                self.max_open = max(self.max_open, self.open_now)
                read = asyncio.create_task(reader.read(4096))
                for k in range(len(request)):
                    writer.write(request[k:k + 1])
                    done, _ = await asyncio.wait({read}, timeout=self.drip)
                    if done:
                        break
                answer = read.result() if read.done() and not read.cancelled() and read.exception() is None else b""
                read.cancel()
                status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"
                self.counts[status] += 1
            except (OSError, asyncio.IncompleteReadError) as e:
                self.counts[type(e).__name__] += 1
            finally:
                if writer is not None:
                    self.open_now -= 1
                    writer.close()
            await asyncio.sleep(self.drip)


def _tiny_checkpoint(root: Path) -> Path:
    """2 training steps of a tiny character HyperLSTM on the pydoc text, through the real CLI."""
    cmd = [sys.executable, "-m", "hypernetworks.cli", "fit", "--config", str(REPO / "configs" / "pydoc-hyperlstm.yaml"),
           "--runs_root", str(root), "--run_name", "tiny", "--model.hidden_size", "32", "--model.hyper_size", "16",
           "--model.embedding_size", "4", "--data.batch_size", "4", "--data.seq_len", "16",
           "--data.eval_batch_size", "4", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2",
           "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return root / "tiny" / "checkpoints" / "last.ckpt"


def start_server(checkpoint: Path, workers: int, queue: int, max_length: int,
                 extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "hypernetworks.cli", "serve", "--checkpoints", str(checkpoint), "--port", "0",
           "--workers", str(workers), "--queue", str(queue), "--max-length", str(max_length), *(extra or [])]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if line.startswith("serving on "):
            url = line.split()[2]
            break
        if time.monotonic() > deadline:
            break
    else:
        raise RuntimeError(f"the server did not start (exit {proc.poll()})")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # drain its log
    return proc, url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a text or handwriting checkpoint (default: train a tiny one)")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--length", type=int, default=100, help="steps per generation")
    p.add_argument("--endpoint", choices=("json", "stream"), default="json")
    p.add_argument("--workers", type=int, default=1, help="the server's --workers")
    p.add_argument("--queue", type=int, default=8, help="the server's --queue")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request before it counts as an error")
    p.add_argument("--json", action="store_true", help="print the summary as JSON only")
    p.add_argument("--flood", type=int, default=0, metavar="N", help="slow-header connections during the burst (0: none)")
    p.add_argument("--flood-source", default="127.0.0.2", help="loopback address the flood connects from")
    p.add_argument("--drip", type=float, default=1.0, help="seconds between the flood's header bytes")
    p.add_argument("--flood-settle", type=float, default=5.0, help="seconds of flood before the burst")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="an option for the server, e.g. --server-arg=--header-timeout=5 (repeatable)")
    p.add_argument("--record", default=None, metavar="PATH",
                   help="write the run as a one-row table record (benchmarks/records.py) at PATH, e.g. "
                        "results/serve/json-defaults.json; benchmarks/report.py joins such records into one table")
    p.add_argument("--label", default=None, help="the record's row label (default: the endpoint and server options)")
    args = p.parse_args(argv)
    started = None
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from records import conditions

        started = conditions(omp_num_threads=os.environ.get("OMP_NUM_THREADS", "unset"))
    if not 1 <= args.requests <= 500:
        p.error("--requests must be in 1..500")
    if not 0 <= args.flood <= 2000:
        p.error("--flood must be in 0..2000")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or _tiny_checkpoint(Path(tmp))
        if not ckpt.is_file():
            p.error(f"--checkpoint: no such file: {ckpt}")
        proc, url = start_server(ckpt, args.workers, args.queue, max(args.length, 1), args.server_arg)
        flood = None
        try:
            # One request first, so the model load is not part of the burst.
            warm = burst(url, {"checkpoint": ckpt.name, "length": 2}, n=1, timeout=args.timeout)
            if warm[0].get("status") != 200:
                raise RuntimeError(f"warm-up request failed: {warm[0]}")
            if args.flood:
                flood = SlowHeaderFlood(url, args.flood, args.flood_source, args.drip).start()
                time.sleep(args.flood_settle)
                flood.sampling = True
            results = burst(url, {"checkpoint": ckpt.name, "length": args.length, "seed": 1}, n=args.requests,
                            timeout=args.timeout, endpoint=args.endpoint)
        finally:
            flood_summary = flood.stop() if flood is not None else None
            proc.terminate()
            proc.wait(30)
    summary = summarize(results)
    if flood_summary is not None:
        summary["flood"] = flood_summary
    if args.json:
        print(json.dumps(summary))
    else:
        load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average at the end {load[0]:.2f}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        print(f"{args.requests} simultaneous requests to /api/generate{'/stream' if args.endpoint == 'stream' else ''}"
              f" (length {args.length}; server --workers {args.workers} --queue {args.queue} {' '.join(args.server_arg)})"
              + (f" during a slow-header flood of {args.flood} connections from {args.flood_source}"
                 f" (one byte every {args.drip:g} s, burst after {args.flood_settle:g} s)" if args.flood else ""))
        for k, v in summary.items():
            print(f"  {k:<18} {round(v, 3) if isinstance(v, float) else v}")
    if args.record:
        _write_record(args, summary, started)
    ok = summary["errors"] == 0 and set(summary["status"]) <= {200, 503}
    return 0 if ok else 1


def _pair(a, b) -> str:
    return "–" if a is None else f"{a:.2f} s / {b:.2f} s"


def _write_record(args, summary: dict, started: dict) -> None:
    from records import write_record

    label = args.label or (f"`/api/generate{'/stream' if args.endpoint == 'stream' else ''}`, --workers {args.workers}"
                           f" --queue {args.queue}" + (f", flood of {args.flood}" if args.flood else "")
                           + (" " + " ".join(args.server_arg) if args.server_arg else ""))
    answers = ", ".join(f"{n} × {code}" for code, n in sorted(summary["status"].items()))
    flood = summary.get("flood")
    held = "–" if not flood else (f"{flood['max_open']} held at most; server answers "
                                  + ", ".join(f"{v} × {k}" for k, v in flood["closed_by_server"].items()))
    row = [label, str(summary["errors"]), answers or "–", _pair(summary["p50_200_s"], summary["p95_200_s"]),
           _pair(summary["p50_503_s"], summary["p95_503_s"]),
           _pair(summary["p50_first_step_s"], summary["p95_first_step_s"]), held]
    write_record(args.record, name=Path(args.record).stem,
                 title=f"{args.requests} simultaneous requests, length {args.length}", started=started,
                 columns=["conditions", "connection errors", "answers", "p50 / p95 of the 200s",
                          "p50 / p95 of the 503s", "p50 / p95 first steps", "flood connections"],
                 rows=[row], values=summary)
    print(f"wrote {args.record}")


if __name__ == "__main__":
    sys.exit(main())

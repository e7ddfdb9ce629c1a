"""One-step-at-a-time generation speed (steps per second) of the recurrent layers.

Sampling a char LM, the handwriting model, beam search and the demo server call the layer on
length-1 input with the state carried, under ``torch.no_grad()``. This measures that loop for each
layer on the fused path (prepared weights cached on the cell, compiled step kernels) against the
eager per-step ``step`` that such calls ran before (``cell.fused = False``), and torch.nn.LSTM.
Models take turns within each round; the median over rounds is reported.

    OMP_NUM_THREADS=1 python benchmarks/generation_speed.py                  # PTB size, batch 1
    OMP_NUM_THREADS=1 python benchmarks/generation_speed.py --batch 8        # e.g. a beam of 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from hypernetworks.nn import LSTM, HyperLSTM  # noqa: E402


def build(name: str, a) -> torch.nn.Module:
    hyper = dict(hyper_size=a.hyper_size, embedding_size=a.embedding_size)
    if name == "torch.nn.LSTM":
        return torch.nn.LSTM(a.input_size, a.hidden_size)
    kind, _, path = name.partition(" (")
    if kind == "LN LSTM":
        m = LSTM(a.input_size, a.hidden_size, layer_norm=True)
    elif kind == "HyperLSTM":
        m = HyperLSTM(a.input_size, a.hidden_size, **hyper)
    elif kind == "LN HyperLSTM":
        m = HyperLSTM(a.input_size, a.hidden_size, layer_norm=True, **hyper)
    else:
        raise ValueError(name)
    for cell in m.cells:
        cell.fused = path.startswith("fused")
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input-size", type=int, default=50)
    p.add_argument("--hidden-size", type=int, default=1000)
    p.add_argument("--hyper-size", type=int, default=128)
    p.add_argument("--embedding-size", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=200, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall (default) or cpu: this process's CPU time (excludes waiting for a core under load)")
    a = p.parse_args(argv)
    now = time.perf_counter if a.clock == "wall" else time.process_time
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    names = ["torch.nn.LSTM"] + [f"{k} ({path})" for k in ("LN LSTM", "HyperLSTM", "LN HyperLSTM")
                                 for path in ("eager step, before", "fused step")]
    torch.manual_seed(0)
    models = {n: build(n, a).to(dev).eval() for n in names}
    x = torch.randn(1, a.batch, a.input_size, device=dev)

    def run(m, steps):
        state = None
        for _ in range(steps):
            out, state = m(x, state)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times = {n: [] for n in names}
    with torch.no_grad():
        for m in models.values():
            run(m, 5)  # warm-up: kernel build and load, caches
        for _ in range(a.rounds):
            for n, m in models.items():
                t0 = now()
                run(m, a.steps)
                times[n].append(now() - t0)
    base = a.steps / statistics.median(times["torch.nn.LSTM"])
    print(f"generation, one step per call under no_grad: input {a.input_size}, hidden {a.hidden_size}, hyper "
          f"{a.hyper_size}, N_z {a.embedding_size}, batch {a.batch}; {a.steps} steps x {a.rounds} rounds (median); "
          f"{dev.type}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {a.clock} clock, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| layer | steps/s | vs torch.nn.LSTM |")
    print("|---|---:|---:|")
    for n in names:
        rate = a.steps / statistics.median(times[n])
        print(f"| {n} | {rate:,.0f} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

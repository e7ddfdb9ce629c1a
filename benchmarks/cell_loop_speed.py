"""Single-step recurrent cells in a Python step loop, as ratios to torch.nn.LSTMCell.

    python benchmarks/cell_loop_speed.py               # the time-series example's size (below)
    python benchmarks/cell_loop_speed.py --quick       # smoke run
    python benchmarks/cell_loop_speed.py --dtype float32 --clock cpu   # float32; process CPU time (loaded machine)
    python benchmarks/cell_loop_speed.py --sequence    # also the sequence layers at the demo's size
    python benchmarks/cell_loop_speed.py --sequence --processes 5   # ... in 5 fresh processes (median, range)

The loop is that of PyTorch's public time-series example (``time_sequence_prediction``): two
stacked cells (input 1 -> hidden 51 -> hidden 51) and a linear read-out, float64, batch 97, a
step loop written for nn.LSTMCell::

    h1, c1 = cell1(x_t, (h1, c1)); h2, c2 = cell2(h1, (h2, c2)); y_t = linear(h2)

from zero (h, c) of nn.LSTMCell's shapes, over 300 steps, then ``sum(y).backward()``. HyperLSTMCell
(hyper 16, N_z 4) runs the same loop unchanged: its ``c`` carries the hyper state after the first
step. ``--sequence`` also times one forward + backward of the sequence layers (HyperLSTM against
torch.nn.LSTM) at the command-line demo's size: input 50, hidden 128, hyper 32, N_z 4, 64 steps,
batch 32, float32. Times are medians over interleaved rounds (the models take turns so that load
from other processes spreads evenly over them), on one thread unless ``--threads`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1] / "src"  # the package, when run from a checkout without installing
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hypernetworks.nn import HyperLSTM, HyperLSTMCell, LSTMCell  # noqa: E402

LOOP = dict(input_size=1, hidden_size=51, hyper_size=16, embedding_size=4, steps=300, batch=97)
LOOP_QUICK = dict(LOOP, steps=20)
SEQUENCE = dict(input_size=50, hidden_size=128, hyper_size=32, embedding_size=4, seq_len=64, batch=32)
SEQUENCE_QUICK = dict(SEQUENCE, seq_len=8)
CELLS = ("torch.nn.LSTMCell", "HyperLSTMCell", "LSTMCell", "HyperLSTMCell (eager)")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class StackedCells(nn.Module):
    """The time-series example's model with a chosen cell class."""

    def __init__(self, kind: str, size: dict) -> None:
        super().__init__()
        I, H = size["input_size"], size["hidden_size"]
        if kind == "torch.nn.LSTMCell":
            make = nn.LSTMCell
        elif kind in ("HyperLSTMCell", "HyperLSTMCell (eager)"):
            def make(i, h):
                cell = HyperLSTMCell(i, h, hyper_size=size["hyper_size"], embedding_size=size["embedding_size"])
                cell.fused = kind == "HyperLSTMCell"  # (eager): the per-step reference ops, for comparison
                return cell
        elif kind == "LSTMCell":
            make = LSTMCell
        else:
            raise ValueError(f"unknown cell {kind!r}")
        self.hidden_size = H
        self.lstm1, self.lstm2 = make(I, H), make(H, H)
        self.linear = nn.Linear(H, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, 1) as in the example
        B, H = x.size(0), self.hidden_size
        h1 = c1 = h2 = c2 = x.new_zeros(B, H)
        outputs = []
        for x_t in x.split(1, dim=1):
            h1, c1 = self.lstm1(x_t.squeeze(1), (h1, c1))
            h2, c2 = self.lstm2(h1, (h2, c2))
            outputs.append(self.linear(h2))
        return torch.cat(outputs, dim=1)


def _rounds(fns: dict, repeats: int, clock: str) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for n, fn in fns.items():
            t0 = now()
            fn()
            times[n].append(now() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def time_loop(kinds, size: dict, repeats: int, clock: str, dtype=torch.float64) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(size["batch"], size["steps"], size["input_size"], dtype=dtype)
    models = {k: StackedCells(k, size).to(dtype) for k in kinds}

    def run(m):
        def fn():
            m(x).sum().backward()
            m.zero_grad(set_to_none=True)
        return fn
    return _rounds({k: run(m) for k, m in models.items()}, repeats, clock)


def time_sequence(size: dict, repeats: int, clock: str) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(size["seq_len"], size["batch"], size["input_size"])
    I, H = size["input_size"], size["hidden_size"]
    models = {"torch.nn.LSTM": nn.LSTM(I, H),
              "HyperLSTM": HyperLSTM(I, H, hyper_size=size["hyper_size"], embedding_size=size["embedding_size"])}

    def run(m):
        def fn():
            m(x)[0].sum().backward()
            m.zero_grad(set_to_none=True)
        return fn
    return _rounds({k: run(m) for k, m in models.items()}, repeats, clock)


def _table(title: str, times: dict[str, float], ref: str, record: str | None = None, started=None,
           values=None) -> None:
    columns = ["model", "fwd+bwd time (s)", f"time / {ref}"]
    rows = [[n, f"{t:.4f}", f"{t / times[ref]:.2f}x"] for n, t in times.items()]
    print(title + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from records import emit_table

    emit_table(columns, rows, record, title=title, started=started, values={"seconds": times, **(values or {})})
    print()


def _in_processes(args, repeats: int) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The sequence timings of ``args.processes`` fresh processes, one after another: (the process
    with the median ratio, all of them)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--sequence-child", "--threads", str(args.threads),
           "--clock", args.clock, "--repeats", str(repeats)] + (["--quick"] if args.quick else [])
    runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            for _ in range(args.processes)]
    order = sorted(runs, key=lambda r: r["HyperLSTM"] / r["torch.nn.LSTM"])
    return order[len(order) // 2], runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps and rounds: a smoke run")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15, quick 3)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default) or cpu: this process's CPU time (excludes waiting for a core on a loaded "
                        "machine; meaningful with one thread)")
    p.add_argument("--cells", nargs="+", default=list(CELLS[:2]), choices=CELLS, metavar="CELL",
                   help=f"cells to time in the loop (torch.nn.LSTMCell is always included): {', '.join(CELLS)}")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="the loop's dtype (default float64, as the time-series example)")
    p.add_argument("--steps", type=int, default=None, help="time steps of the loop (default 300, quick 20)")
    p.add_argument("--sequence", action="store_true", help="also time HyperLSTM vs torch.nn.LSTM at the demo's size")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="time the sequence layers in N fresh processes (each its own interleaved rounds) and "
                        "report the median process with the range of the ratio over them (default 1)")
    p.add_argument("--sequence-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--record", default=None, metavar="PATH",
                   help="write the step-loop table as a record at PATH (and the --sequence table at PATH with "
                        "-sequence before .json), e.g. results/speed/cell-loop.json")
    args = p.parse_args(argv)
    if args.sequence_child:  # one process of --processes: the sequence timings as JSON
        torch.set_num_threads(args.threads)
        size = SEQUENCE_QUICK if args.quick else SEQUENCE
        print(json.dumps(time_sequence(size, args.repeats or (3 if args.quick else 15), args.clock)))
        return 0
    started = None
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from records import conditions

        started = conditions(torch_threads=args.threads, clock=args.clock)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 15)
    kinds = ["torch.nn.LSTMCell"] + [k for k in args.cells if k != "torch.nn.LSTMCell"]
    size = dict(LOOP_QUICK if args.quick else LOOP)
    if args.steps:
        size["steps"] = args.steps
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    head = (f"{torch.get_num_threads()} thread(s); torch {torch.__version__}; median of {repeats} interleaved "
            f"rounds; {args.clock} clock{load}")
    desc = ", ".join(f"{k}={v}" for k, v in size.items())
    _table(f"Step loop of two stacked cells, {args.dtype}, fwd+bwd, {desc}; {head}",
           time_loop(kinds, size, repeats, args.clock, getattr(torch, args.dtype)), "torch.nn.LSTMCell",
           args.record, started, {"size": size, "dtype": args.dtype, "repeats": repeats})
    if args.sequence:
        size = SEQUENCE_QUICK if args.quick else SEQUENCE
        desc = ", ".join(f"{k}={v}" for k, v in size.items())
        values = {"size": size, "repeats": repeats}
        if args.processes > 1:
            times, runs = _in_processes(args, repeats)
            ratios = [r["HyperLSTM"] / r["torch.nn.LSTM"] for r in runs]
            values.update(processes=args.processes, ratios=ratios)
            head_seq = (f"{head}; the median of {args.processes} fresh processes (ratio over them "
                        f"{min(ratios):.2f}x to {max(ratios):.2f}x)")
        else:
            times, head_seq = time_sequence(size, repeats, args.clock), head
        _table(f"Sequence layer, float32, fwd+bwd, {desc}; {head_seq}", times, "torch.nn.LSTM",
               args.record and str(Path(args.record).with_name(Path(args.record).stem + "-sequence.json")), started,
               values)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

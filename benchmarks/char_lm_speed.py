"""Char LM training throughput (characters per second) for each cell, as ratios to the LSTM.

One training step = forward, cross-entropy, backward, Adam step on a (batch, seq_len) window of
one-hot characters, the state carried between windows as in training. The cells are measured in
interleaved rounds (so a load change on a shared machine hits all of them alike) and the median
step time of each is reported.

    OMP_NUM_THREADS=1 python benchmarks/char_lm_speed.py --hidden-size 256 --batch-size 32 --seq-len 100
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from hypernetworks.models.char_lm import CharLM  # noqa: E402
from hypernetworks.tasks.language_model import detach_state  # noqa: E402

CELLS = ("lstm", "ln-lstm", "hyperlstm", "ln-hyperlstm")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--hyper-size", type=int, default=64)
    p.add_argument("--embedding-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--record", default=None, metavar="PATH", help="also write the table as a record at PATH")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall (default) or cpu: this process's CPU time, which excludes the time it waits for a "
                        "core on a loaded machine (meaningful with --threads 1)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from records import conditions, emit_table

    started = conditions(torch_threads=args.threads or torch.get_num_threads())
    now = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    setups = {}
    for cell in CELLS:
        m = CharLM(args.vocab_size, cell, args.hidden_size, hyper_size=args.hyper_size,
                   embedding_size=args.embedding_size, input_dropout=0.1, output_dropout=0.1,
                   recurrent_dropout=0.1).to(dev)
        setups[cell] = [m, torch.optim.Adam(m.parameters(), 1e-3), None, []]
    x = torch.randint(args.vocab_size, (args.batch_size, args.seq_len), device=dev)
    y = torch.randint(args.vocab_size, (args.batch_size, args.seq_len), device=dev)

    def step(cell):
        m, opt, state, _ = setups[cell]
        logits, state = m(x, state)
        loss = F.cross_entropy(logits.reshape(-1, args.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        setups[cell][2] = detach_state(state)

    for cell in CELLS:  # warm-up
        step(cell)
    for _ in range(args.rounds):
        for cell in CELLS:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = now()
            step(cell)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            setups[cell][3].append(now() - t0)
    chars = args.batch_size * args.seq_len
    base = statistics.median(setups["lstm"][3])
    print(f"char LM training throughput: hidden {args.hidden_size}, hyper {args.hyper_size}, N_z {args.embedding_size}, "
          f"vocab {args.vocab_size}, batch {args.batch_size} x seq {args.seq_len}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} thread(s), {args.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.clock} clock, load average {os.getloadavg()[0]:.1f}")
    print()
    columns = ["cell", "params", "step (ms, median)", "chars/s", "time vs LSTM"]
    rows = []
    for cell in CELLS:
        t = statistics.median(setups[cell][3])
        n = sum(q.numel() for q in setups[cell][0].parameters())
        rows.append([cell, f"{n:,}", f"{t * 1e3:.1f}", f"{chars / t:,.0f}", f"{t / base:.2f}x"])
    emit_table(columns, rows, args.record, started=started,
               values={"seconds": {c: statistics.median(setups[c][3]) for c in CELLS}},
               title=f"char LM training step, hidden {args.hidden_size}, hyper {args.hyper_size}, batch "
                     f"{args.batch_size} x {args.seq_len}, {torch.get_num_threads()} thread(s), {args.clock} clock")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-step cost of the channel-adaptive ViTs of the CIFAR-10 stand-in (docs/channels.md).

    python benchmarks/channels_speed.py                # tiny-p4 models, batch 64, 3 channels, 1 thread
    python benchmarks/channels_speed.py --channels 1   # one channel present

Forward + backward (cross-entropy) of one batch, median of interleaved rounds, process CPU time
(fair on a loaded machine) or wall clock; prints a markdown table with the ratios to the HyperNet ViT.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1] / "src"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hypernetworks.models.registry import create_model  # noqa: E402

MODELS = ("hypernet-vit-tiny-p4", "fixed-vit-tiny-p4", "channelvit-tiny-p4")
NAMES = ("red", "green", "blue")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--record", default=None, metavar="PATH", help="also write the table as a record at PATH")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from records import conditions

    started = conditions(torch_threads=a.threads, clock=a.clock)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    present = list(NAMES[: a.channels])
    x = torch.randn(a.batch, a.channels, 32, 32)
    y = torch.randint(0, 10, (a.batch,))
    models = {n: create_model(n) for n in MODELS}
    times: dict[str, list[float]] = {n: [] for n in MODELS}
    for r in range(a.rounds + 1):  # round 0 warms up
        for n, m in models.items():
            m.zero_grad(set_to_none=True)
            t = clock()
            torch.nn.functional.cross_entropy(m(x, channels=present), y).backward()
            if r:
                times[n].append(clock() - t)
    base = statistics.median(times[MODELS[0]])
    print(f"batch {a.batch}, channels {present}, {a.threads} thread(s), {a.clock} clock, median of {a.rounds} "
          f"interleaved rounds; torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from records import emit_table

    rows = [[n, f"{sum(q.numel() for q in m.parameters()):,}", f"{statistics.median(times[n]):.3f}",
             f"{statistics.median(times[n]) / base:.2f}x"] for n, m in models.items()]
    emit_table(["model", "params", "train step (s)", "vs HyperNet ViT"], rows, a.record, started=started,
               title=f"stand-in ViTs, forward + backward, batch {a.batch}, {a.channels} channels, {a.threads} thread(s), "
                     f"{a.clock} clock, median of {a.rounds} interleaved rounds",
               values={"seconds": {n: statistics.median(times[n]) for n in models}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-step time of Hyper WRN 40-k against WRN 40-k, and of the materialised model.

    python benchmarks/static_speed.py                       # CPU, batch 16, WRN 40-2
    python benchmarks/static_speed.py --device cuda --batch 128

One step = forward, cross-entropy, backward, Adam update, on a batch of real CIFAR-10 test images
(<data folder>/cifar10, the data folder being $HYPERNETWORKS_DATA or the per-user default;
random images if it is absent). The models are timed in interleaved rounds
(so that load from other processes hits all of them alike) and the median step time is reported:

- WRN 40-k: the conventional net;
- Hyper WRN 40-k (``hyperize`` of WRN 40-k): every tile of every generated layer made by one
  batched generator call per step;
- Hyper, one call per layer: a copy without hyperize's batching hook, so each layer's weight
  parametrization calls the generator itself (for reference);
- materialised: ``materialise(hyper)``, i.e. a plain WRN again (it trains its kernels directly).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from hypernetworks import create_model, materialise  # noqa: E402
from hypernetworks.nn.static import BatchedGeneration  # noqa: E402
from hypernetworks.data.images import CIFAR10, default_data_root  # noqa: E402


def batch(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        ds = CIFAR10(default_data_root() / "cifar10", train=False, limit_per_class=(n + 9) // 10)
        x, y = ds.data[:n].float().div(255), ds.targets[:n]
        source = "CIFAR-10 test images"
    except (FileNotFoundError, RuntimeError):
        x, y = torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,))
        source = "random images (CIFAR-10 not found)"
    print(f"batch: {n} {source}")
    return ((x - 0.5) / 0.25).to(device), y.to(device)


def per_layer(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a hyperized model without its batching hook: each layer calls the generator itself."""
    model = copy.deepcopy(model)
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, BatchedGeneration)]:
            del hooks[key]
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=2, choices=(1, 2))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="steps per model per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--record", default=None, metavar="PATH", help="also write the table as a record at PATH")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from records import conditions, emit_table

    started = conditions(torch_threads=args.threads or torch.get_num_threads())
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x, y = batch(args.batch, device)
    hyper = create_model(f"hyper-wrn-40-{args.width}").to(device)
    models = {
        f"WRN 40-{args.width}": create_model(f"wrn-40-{args.width}").to(device),
        f"Hyper WRN 40-{args.width}": hyper,
        "  (one generator call per layer)": per_layer(hyper),
        "materialised Hyper WRN": materialise(hyper),
    }
    opts = {k: torch.optim.Adam(m.parameters(), 1e-3) for k, m in models.items()}

    def step(name: str) -> None:
        loss = F.cross_entropy(models[name](x), y)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {k: [] for k in models}
    for name in models:  # warm-up
        for _ in range(2):
            step(name)
    for _ in range(args.rounds):
        for name in models:
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            sync()
            times[name].append((time.perf_counter() - t) / args.steps)
    base = statistics.median(times[f"WRN 40-{args.width}"])
    print(f"\ndevice: {device} ({torch.get_num_threads()} threads), batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps, median step time\n")
    columns = ["model", "ms / training step", "ratio to WRN"]
    rows = [[name.strip(), f"{1000 * statistics.median(ts):.1f}", f"{statistics.median(ts) / base:.2f}x"]
            for name, ts in times.items()]
    emit_table(columns, rows, args.record, started=started, values={"seconds": {k.strip(): v for k, v in times.items()}},
               title=f"{device} ({torch.get_num_threads()} threads), batch {args.batch}, {args.rounds} rounds x "
                     f"{args.steps} steps, median step time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

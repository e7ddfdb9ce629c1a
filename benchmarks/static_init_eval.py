"""Accuracy and loss of CIFAR-10 classifiers on a class-balanced slice of the test set.

    python benchmarks/static_init_eval.py --per-class 100 runs/X/checkpoints/last.ckpt ...
    python benchmarks/static_init_eval.py --metrics runs/X/csv/version_0/metrics.csv --window 50

Used for the initialisation comparison in docs/static.md. When those runs were made, the CPU
recipes validated on the first 1,000 test images, which in the CIFAR-10 copy used here are all of
one class (airplane), so their ``val_acc`` said nothing (since fixed: validation now reads the test
set in a class-balanced order); this script takes the first ``--per-class`` images of every class.
``--metrics`` prints the mean logged training loss per window of steps from a run's CSV log.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from hypernetworks.data.images import CIFAR10, CIFAR10DataModule, default_data_root  # noqa: E402


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 100) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def loss_windows(path: str, window: int) -> list[tuple[int, int, float]]:
    """(first step, last step, mean train_loss) per window of logged steps."""
    rows = [r for r in csv.DictReader(open(path)) if r.get("train_loss")]
    out: dict[int, list[float]] = {}
    for r in rows:
        out.setdefault(int(r["step"]) // window, []).append(float(r["train_loss"]))
    return [(k * window, (k + 1) * window - 1, sum(v) / len(v)) for k, v in sorted(out.items())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--per-class", type=int, default=100, help="test images per class")
    p.add_argument("--metrics", action="append", default=[], help="a run's metrics.csv")
    p.add_argument("--window", type=int, default=50)
    args = p.parse_args(argv)
    for path in args.metrics:
        print(f"{path}: mean logged train loss per {args.window} steps")
        for a, b, loss in loss_windows(path, args.window):
            print(f"  steps {a}-{b}: {loss:.3f}")
    if not args.checkpoints:
        return 0
    ds = CIFAR10(default_data_root() / "cifar10", train=False, limit_per_class=args.per_class)
    transform = CIFAR10DataModule.transform(CIFAR10DataModule(root=str(default_data_root() / "cifar10")), False)
    x = torch.stack([transform(img) for img in ds.data])
    y = torch.as_tensor(ds.targets)
    print(f"test images: {len(y)} ({args.per_class} per class: {torch.bincount(y).tolist()})")
    print("| model | accuracy | loss |\n|---|---:|---:|")
    from hypernetworks.training import load_task

    for path in args.checkpoints:
        task = load_task(path)
        acc, loss = evaluate(task.model, x, y)
        print(f"| {path} | {100 * acc:.1f}% | {loss:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``hypernetworks kernels --checkpoint X --out k.png``: draw a checkpoint's conv kernels.

For a hypernetwork model (a hyperized one, or one with HyperConv2d layers) its generated weights
are made (one batched call per generator) and drawn: conv kernels as grids of f x f cells, Conv1d
kernels as rows of k cells, Linear weights as matrices; for a conventional model its k x k (k > 1)
conv kernels are drawn, for comparison.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from hypernetworks.nn.static import generated_weights
from hypernetworks.viz.kernels import save_kernel_grid
from hypernetworks.commands import description


def collect_kernels(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], bool]:
    """[(layer name, kernel)] of the generated layers, or of the ordinary k x k convs if none."""
    hyper = generated_weights(model)
    if hyper:
        return hyper, True
    convs = [(n, m.weight.detach()) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    return convs, False


def _layer_selection(spec: str, n: int) -> list[int]:
    if spec == "all":
        return list(range(n))
    try:
        idx = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--layers must be 'all' or comma-separated integers, got {spec!r}") from None
    bad = [i for i in idx if not -n <= i < n]
    if bad or not idx:
        raise ValueError(f"--layers {spec!r}: the model has {n} drawable layers (0..{n - 1})")
    return [i % n for i in idx]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hypernetworks kernels", description=description(__doc__))
    p.add_argument("--checkpoint", required=True, help="a checkpoint of an image classifier")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--layers", default="all", help="'all' or indices such as 0,1,12 (in model order)")
    p.add_argument("--max-channels", type=int, default=16,
                   help="draw the first N x N kernels of each layer (16: one basic tile); 0 for all")
    args = p.parse_args(argv)
    from hypernetworks.training import load_task

    try:
        task = load_task(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    model = getattr(task, "model", task)
    kernels, generated = collect_kernels(model)
    if not kernels:
        p.error(f"{args.checkpoint}: the model has no conv kernels to draw")
    try:
        chosen = [kernels[i] for i in _layer_selection(args.layers, len(kernels))]
    except ValueError as e:
        p.error(str(e))
    hparams = getattr(task, "hparams", None) or {}
    name = hparams.get("model") or type(model).__name__
    kind = "generated" if generated else "conventional"
    out = save_kernel_grid(chosen, args.out, max_channels=args.max_channels or None,
                           title=f"{name}: {kind} kernels ({len(chosen)} of {len(kernels)} layers)")
    print(f"wrote {out} ({len(chosen)} {kind} layers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The paper's saturation analysis: histograms of the main LSTM's hidden states h_t and cell
states c_t (last layer) while a model reads a passage, for several models side by side
(e.g. LSTM, LN LSTM, HyperLSTM), as one PNG.

    python -m hypernetworks.viz.saturation runs/ptb-small-{lstm,ln-lstm,hyperlstm}/checkpoints/last.ckpt \\
        --text-file /path/to/data/ptb/ptb.valid.txt --chars 2000 --out runs/saturation.png
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping

import torch

from hypernetworks.viz.figures import save_figure


@torch.no_grad()
def collect_states(task, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened h and c of the last layer of ``task.net`` at every step of ``text``."""
    task.eval()
    ids = task.encode(text).view(1, -1).to(task.device)
    _, _, h, c = task.net.forward_with_states(ids)
    return h.flatten().float().cpu(), c.flatten().float().cpu()


def checkpoint_states(checkpoints, text: str) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(name, checkpoint, h, c) per checkpoint while its model reads ``text``; characters outside a
    model's vocabulary are dropped."""
    from hypernetworks.training import load_task

    out = []
    for ckpt in checkpoints:
        task = load_task(ckpt)
        vocab = set(task.vocab)
        h, c = collect_states(task, "".join(ch for ch in text if ch in vocab))
        out.append((f"{task.hparams.cell} {task.hparams.hidden_size}", str(ckpt), h, c))
    return out


def plot_saturation(states: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path,
                    bins: int = 60) -> Path:
    """One column per model: top row h_t in [-1, 1], bottom row c_t (clipped to [-5, 5])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not states:
        raise ValueError("states must name at least one model")
    n = len(states)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 5), squeeze=False)
    for j, (name, (h, c)) in enumerate(states.items()):
        axes[0, j].hist(h.numpy(), bins=bins, range=(-1, 1), density=True, color="#1f77b4")
        axes[0, j].set_title(name, fontsize=9)
        axes[1, j].hist(c.clamp(-5, 5).numpy(), bins=bins, range=(-5, 5), density=True, color="#d62728")
        sat = float((h.abs() > 0.95).float().mean())
        axes[0, j].text(0.02, 0.95, f"|h|>0.95: {sat:.1%}", transform=axes[0, j].transAxes, va="top", fontsize=8)
    axes[0, 0].set_ylabel("hidden state h_t")
    axes[1, 0].set_ylabel("cell state c_t (clipped to ±5)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hypernetworks.viz.saturation", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--text-file", required=True, help="text the models read (e.g. a validation split)")
    p.add_argument("--chars", type=int, default=2000, help="characters to read (default 2000)")
    p.add_argument("--out", default="saturation.png")
    args = p.parse_args(argv)
    text = Path(args.text_file).read_text(encoding="utf-8")[: args.chars]
    states = {name: (h, c) for name, _, h, c in checkpoint_states(args.checkpoints, text)}
    print(plot_saturation(states, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

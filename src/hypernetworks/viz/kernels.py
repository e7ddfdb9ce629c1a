"""Conv kernels as image grids (the paper's figure of generated 16x16x3x3 kernels).

A kernel (out, in, f, f) becomes a mosaic: one f x f cell per (output row, input column), cells
separated by a 1-pixel gap; values on a symmetric diverging colour scale (red > 0, blue < 0).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from hypernetworks.viz.figures import save_figure

__all__ = ["kernel_mosaic", "save_kernel_grid"]


def kernel_mosaic(weight: Tensor, max_out: int | None = None, max_in: int | None = None, gap: int = 1) -> np.ndarray:
    """(out, in, f, f) -> 2-d array with NaN gaps; only the first max_out x max_in kernels.
    A Conv1d kernel (out, in, k) gives rows of 1 x k cells, a Linear weight (out, in) a plain matrix."""
    if weight.dim() == 2:
        return weight.detach().float().cpu()[:max_out, :max_in].numpy()
    if weight.dim() == 3:
        weight = weight.unsqueeze(2)
    if weight.dim() != 4:
        raise ValueError(f"weight must be (out, in, f, f), (out, in, k) or (out, in), got shape {tuple(weight.shape)}")
    w = weight.detach().float().cpu()[:max_out, :max_in].numpy()
    o, i, fh, fw = w.shape
    img = np.full((o * (fh + gap) - gap, i * (fw + gap) - gap), np.nan, dtype=np.float32)
    for r in range(o):
        for c in range(i):
            img[r * (fh + gap): r * (fh + gap) + fh, c * (fw + gap): c * (fw + gap) + fw] = w[r, c]
    return img


def save_kernel_grid(kernels: Sequence[tuple[str, Tensor]], path: str | Path, max_channels: int | None = 16,
                     title: str | None = None, ncols: int | None = None) -> Path:
    """One panel per (label, weight); each panel shows the first max_channels x max_channels kernels
    (a 16x16 basic tile by default). Writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not kernels:
        raise ValueError("no kernels to draw")
    n = len(kernels)
    ncols = ncols or min(n, 6)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(2.6 * ncols, 5.0), 2.8 * nrows + (0.4 if title else 0)), squeeze=False)
    cmap = matplotlib.colormaps["RdBu_r"].copy()
    cmap.set_bad("white")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, w) in zip(axes.flat, kernels):
        img = kernel_mosaic(w, max_channels, max_channels)
        lim = float(np.nanmax(np.abs(img))) or 1.0
        ax.imshow(img, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
        shown = f"{min(w.shape[0], max_channels or w.shape[0])}x{min(w.shape[1], max_channels or w.shape[1])}"
        ax.set_title(f"{label}\n{tuple(w.shape)}, first {shown}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=150)



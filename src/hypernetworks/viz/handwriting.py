"""Render pen-offset sequences as SVG or PNG, optionally coloured by the HyperLSTM's activity.

Input is ``(T, 3)`` rows of ``(dx, dy, pen_up)`` in raw pen units (as ``HandwritingTask.generate`` or
``demo_generate`` return them); ``pen_up = 1`` ends a stroke, so no line joins that point to the next.
IAM-OnDB's y axis points down the page like SVG's, so coordinates are drawn unflipped.

With ``intensity`` (``(T, 4)`` per-gate weight-change intensity for gates i, g, f, o, from
:func:`hypernetworks.nn.gate_change_intensity`) each pen step is coloured by its dominant gate
(one hue per gate, as the text pictures), with opacity rising with the total change.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np

from hypernetworks.viz.figures import save_figure

GATE_NAMES = ("i", "g", "f", "o")
GATE_COLOURS = ("#d62728", "#2ca02c", "#1f77b4", "#ff7f0e")  # one hue per gate (matplotlib tab10)


def _as_array(steps) -> np.ndarray:
    a = np.asarray(steps.tolist() if hasattr(steps, "tolist") else steps, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3 or len(a) == 0:
        raise ValueError(f"steps must be a non-empty (T, 3) array of (dx, dy, pen_up), got shape {a.shape}")
    return a


def _intensity(intensity, T: int) -> np.ndarray | None:
    if intensity is None:
        return None
    a = np.asarray(intensity.tolist() if hasattr(intensity, "tolist") else intensity, dtype=np.float64)
    if a.shape != (T, 4):
        raise ValueError(f"intensity must be (T, 4) = ({T}, 4) for the four gates, got shape {a.shape}")
    return a


def segments(steps) -> tuple[np.ndarray, np.ndarray]:
    """Absolute points and the drawn segments: ``(points (T, 2), seg_index (S,))``, where segment k
    joins point ``seg_index[k]`` to the next one (pen down between them)."""
    a = _as_array(steps)
    pts = np.cumsum(a[:, :2], axis=0)
    down = np.flatnonzero(a[:-1, 2] < 0.5)  # a segment from t to t+1 unless the pen lifts at t
    return pts, down


def _segment_colours(intensity: np.ndarray | None, index: np.ndarray) -> list[tuple[str, float]]:
    if intensity is None:
        return [("#000000", 1.0)] * len(index)
    # colour of segment t->t+1 from the step that produced point t+1
    values = intensity[np.minimum(index + 1, len(intensity) - 1)]
    total = values.sum(1)
    scale = np.quantile(total, 0.95) if np.any(total > 0) else 1.0
    alpha = 0.25 + 0.75 * np.clip(total / (scale or 1.0), 0, 1)
    dom = values.argmax(1)
    return [(GATE_COLOURS[d] if t > 0 else "#000000", float(a)) for d, t, a in zip(dom, total, alpha)]


def strokes_to_svg(steps, intensity=None, stroke_width: float = 2.0, margin: float = 20.0,
                   scale: float = 0.25, title: str | None = None) -> str:
    """An SVG document of the handwriting (``scale`` = pixels per pen unit)."""
    pts, index = segments(steps)
    inten = _intensity(intensity, len(pts))
    p = pts * scale
    lo = p.min(0) - margin
    w, h = np.ptp(p, axis=0) + 2 * margin
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
           f'viewBox="{lo[0]:.1f} {lo[1]:.1f} {w:.1f} {h:.1f}">']
    if title:
        out.append(f"<title>{escape(title)}</title>")
    out.append(f'<rect x="{lo[0]:.1f}" y="{lo[1]:.1f}" width="{w:.1f}" height="{h:.1f}" fill="white"/>')
    if inten is None:
        # one path per stroke: M at the start of every stroke, L along it
        d, pen_was_up = [], True
        a = _as_array(steps)
        for t in range(len(p)):
            d.append(f"{'M' if pen_was_up else 'L'}{p[t, 0]:.1f},{p[t, 1]:.1f}")
            pen_was_up = a[t, 2] >= 0.5
        out.append(f'<path d="{" ".join(d)}" fill="none" stroke="black" stroke-width="{stroke_width}" '
                   'stroke-linecap="round" stroke-linejoin="round"/>')
    else:
        for k, (colour, alpha) in zip(index, _segment_colours(inten, index)):
            out.append(f'<line x1="{p[k, 0]:.1f}" y1="{p[k, 1]:.1f}" x2="{p[k + 1, 0]:.1f}" y2="{p[k + 1, 1]:.1f}" '
                       f'stroke="{colour}" stroke-opacity="{alpha:.2f}" stroke-width="{stroke_width}" '
                       'stroke-linecap="round"/>')
        for i, (name, colour) in enumerate(zip(GATE_NAMES, GATE_COLOURS)):  # legend
            out.append(f'<text x="{lo[0] + 5 + 22 * i:.1f}" y="{lo[1] + 14:.1f}" fill="{colour}" '
                       f'font-family="sans-serif" font-size="12">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


def plot_strokes(steps, intensity=None, ax=None, linewidth: float = 1.5, title: str | None = None):
    """Draw on a matplotlib axis (a new figure when ``ax`` is None); returns the figure."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba

    pts, index = segments(steps)
    inten = _intensity(intensity, len(pts))
    if ax is None:
        span = np.ptp(pts, axis=0) + 1
        fig, ax = plt.subplots(figsize=(min(16, max(4, span[0] / 300)), min(8, max(1.5, span[1] / 300))))
    fig = ax.figure
    lines = np.stack([pts[index], pts[index + 1]], axis=1)
    colours = [to_rgba(c, a) for c, a in _segment_colours(inten, index)]
    ax.add_collection(LineCollection(lines, colors=colours, linewidths=linewidth, capstyle="round"))
    ax.set_xlim(pts[:, 0].min() - 20, pts[:, 0].max() + 20)
    ax.set_ylim(pts[:, 1].max() + 20, pts[:, 1].min() - 20)  # y grows downwards, as on the page
    ax.set_aspect("equal")
    ax.axis("off")
    if inten is not None:
        from matplotlib.lines import Line2D

        ax.legend([Line2D([], [], color=c) for c in GATE_COLOURS], [f"gate {g}" for g in GATE_NAMES],
                  loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7, ncols=4, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def save_png(steps, path: str | Path, intensity=None, dpi: int = 120, title: str | None = None) -> Path:
    fig = plot_strokes(steps, intensity, title=title)
    return save_figure(fig, path, dpi=dpi, bbox_inches="tight", facecolor="white")


def save_svg(steps, path: str | Path, intensity=None, title: str | None = None) -> Path:
    Path(path).write_text(strokes_to_svg(steps, intensity, title=title), encoding="utf-8")
    return Path(path)


def save_grid_png(samples: Sequence, path: str | Path, titles: Sequence[str] | None = None, dpi: int = 110) -> Path:
    """Several ``(steps, intensity_or_None)`` samples stacked vertically in one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(samples), 1, figsize=(12, 2.2 * len(samples)), squeeze=False)
    for k, (steps, inten) in enumerate(samples):
        plot_strokes(steps, inten, ax=axes[k, 0], title=titles[k] if titles else None)
    return save_figure(fig, path, dpi=dpi, bbox_inches="tight", facecolor="white")

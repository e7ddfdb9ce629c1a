"""The blog's weight-activity picture: a passage with each character shaded by how much the
HyperLSTM changed the main LSTM's four hidden-to-gate scaling vectors d_h at that step.

One colour per gate (input i, candidate g, forget f, output o); each character cell is split into
four horizontal bands, one per gate, whose opacity is that gate's change intensity at the step,
normalised by the gate's 98th percentile over the passage (clipped to 1). Written as a self-contained HTML file
(no external assets) and as a PNG through matplotlib.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

from hypernetworks.viz.figures import save_figure

GATES = ("input i", "candidate g", "forget f", "output o")
COLOURS = ("#d62728", "#2ca02c", "#1f77b4", "#ff7f0e")


def _normalise(intensity: Sequence[Sequence[float]], quantile: float = 0.98) -> list[list[float]]:
    """Per gate, divide by the gate's ``quantile`` over the passage and clip to 1: a robust peak,
    so that one large transient (e.g. the first step) does not wash out the rest."""
    if any(len(row) != 4 for row in intensity):
        raise ValueError("intensity must hold 4 values (i, g, f, o) per step")
    peaks = []
    for g in range(4):
        vals = sorted(row[g] for row in intensity)
        peaks.append(vals[min(len(vals) - 1, int(quantile * len(vals)))] if vals else 0.0)
    return [[min(1.0, row[g] / peaks[g]) if peaks[g] > 0 else 0.0 for g in range(4)] for row in intensity]


def _check(steps: Sequence[str], intensity: Sequence[Sequence[float]]) -> None:
    if len(steps) != len(intensity):
        raise ValueError(f"steps ({len(steps)}) and intensity ({len(intensity)}) differ in length")


def render_activity_html(steps: Sequence[str], intensity: Sequence[Sequence[float]], path: str | Path,
                         title: str = "HyperLSTM weight activity") -> Path:
    """Write the picture as one HTML file (inline CSS only) and return its path."""
    _check(steps, intensity)
    norm = _normalise(intensity)
    cells = []
    for ch, row in zip(steps, norm):
        if ch == "\n":
            cells.append("<br>")
            continue
        bands = "".join(
            f'<i style="background:{c};opacity:{v:.3f}"></i>' for c, v in zip(COLOURS, row))
        tip = ", ".join(f"{g.split()[-1]}={v:.2f}" for g, v in zip(GATES, row))
        glyph = "&nbsp;" if ch == " " else html.escape(ch)
        cells.append(f'<span class="c" title="{html.escape(tip)}"><b>{bands}</b><u>{glyph}</u></span>')
    legend = "".join(f'<span class="k"><i style="background:{c}"></i>{g}</span>' for c, g in zip(COLOURS, GATES))
    all_zero = not any(any(r) for r in norm)
    note = "<p><em>All intensities are zero (not a HyperLSTM, or an untrained one).</em></p>" if all_zero else ""
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 60em; }}
.text {{ font-family: monospace; font-size: 16px; line-height: 1.6; }}
.c {{ position: relative; display: inline-block; width: 0.62em; height: 1.4em; vertical-align: top; }}
.c b {{ position: absolute; inset: 0; display: flex; flex-direction: column; }}
.c b i {{ flex: 1; display: block; }}
.c u {{ position: relative; text-decoration: none; }}
.k {{ margin-right: 1.5em; }} .k i {{ display: inline-block; width: 1em; height: 1em; margin-right: .3em; vertical-align: middle; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p>Each character is shaded by how much the hypernetwork changed the main LSTM's hidden-to-gate
scaling vectors d<sub>h</sub> at that step (norm of d<sub>h</sub>[t] &minus; d<sub>h</sub>[t&minus;1]), one band per gate,
normalised per gate by its 98th percentile over the passage.</p>
<p>{legend}</p>{note}
<div class="text">{''.join(cells)}</div>
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path


def render_activity_png(steps: Sequence[str], intensity: Sequence[Sequence[float]], path: str | Path,
                        title: str = "HyperLSTM weight activity", columns: int = 80, dpi: int = 120) -> Path:
    """Write the picture as a PNG (matplotlib, Agg backend) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    _check(steps, intensity)
    if columns <= 0:
        raise ValueError(f"columns must be positive; got {columns}")
    norm = _normalise(intensity)
    # lay characters out in lines of at most `columns` cells, breaking at newlines
    pos, row, col = [], 0, 0
    for ch in steps:
        if ch == "\n" or col >= columns:
            row, col = row + 1, 0
            if ch == "\n":
                pos.append(None)
                continue
        pos.append((row, col))
        col += 1
    rows = row + 1
    height = rows * 0.26 + 0.45
    fig = plt.figure(figsize=(columns * 0.13 + 0.4, height), dpi=dpi)
    ax = fig.add_axes([0.01, 0.01, 0.98, 1 - 0.35 / height])
    ax.set_xlim(0, columns)
    ax.set_ylim(rows, 0)
    ax.axis("off")
    for ch, p, v in zip(steps, pos, norm):
        if p is None:
            continue
        r, c = p
        for g in range(4):
            if v[g] > 0:
                ax.add_patch(Rectangle((c, r + g * 0.25), 1, 0.25, color=COLOURS[g], alpha=float(v[g]), lw=0))
        if ch.strip():
            ax.text(c + 0.5, r + 0.55, ch, ha="center", va="center", family="monospace", fontsize=8)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in COLOURS]
    fig.legend(handles, GATES, loc="upper right", ncol=4, fontsize=8, frameon=False)
    fig.text(0.01, 0.995, title, fontsize=9, va="top", ha="left")
    return save_figure(fig, path)


def render_activity(steps: Sequence[str], intensity: Sequence[Sequence[float]], out_dir: str | Path,
                    stem: str = "activity", title: str = "HyperLSTM weight activity") -> tuple[Path, Path]:
    """Both files, ``out_dir/<stem>.html`` and ``out_dir/<stem>.png``."""
    out_dir = Path(out_dir)
    return (render_activity_html(steps, intensity, out_dir / f"{stem}.html", title),
            render_activity_png(steps, intensity, out_dir / f"{stem}.png", title))

"""Writing matplotlib figures: one place for the folder, the file and closing the figure."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """Save ``fig`` to ``path`` (creating its folder) and close it, so long runs leak no figures."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, **savefig_kwargs)
    finally:
        plt.close(fig)
    return path

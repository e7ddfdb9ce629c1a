"""``hypernetworks params [pattern]``: parameter counts of every registered model.

Counts come from ``hypernetworks.nn.static.parameter_report``: "ordinary" parameters plus any
groups that a model's submodules declare (``generator`` and ``embeddings`` for static
hypernetworks, ...). "generated" is how many kernel weights the generators make, i.e. what the
conventional twin stores in those layers, and "hypernetwork" (generator + embeddings) what replaces
them: the paper's per-layer convention for MNIST (4,244 against 12,544). "paper convention" counts
a model the way the paper's printed plain count does (WRN 40-1: 0.563M, WRN 40-2: 2.236M): that
figure, less the generated weights, plus the hypernetwork. Models are built on the meta device
(no memory, no init).
"""
from __future__ import annotations

import argparse

import torch

from hypernetworks.models.registry import create_model, list_models
from hypernetworks.nn.static import parameter_report
from hypernetworks.commands import description

_FIRST = ("total", "ordinary")
_LAST = ("hypernetwork", "generated", "plain_convention")
_TITLES = {"plain_convention": "paper convention"}

#: The paper's printed counts of the plain nets (0.563M, 2.236M; Table 2); our nets have 930 and
#: 7,546 more, all in layers that are ordinary in both twins. Hyper twins are counted against them.
PAPER_PLAIN_COUNTS = {"wrn-40-1": 563_000, "wrn-40-2": 2_236_000}


def paper_plain_count(name: str) -> int | None:
    return PAPER_PLAIN_COUNTS.get(name.removeprefix("hyper-"))


def model_report(name: str) -> dict[str, int]:
    try:
        with torch.device("meta"):  # counts need shapes only
            model = create_model(name)
    except Exception:  # an init that the meta device cannot run: build it for real
        model = create_model(name)
    return parameter_report(model, plain_count=paper_plain_count(name))


def _fmt(n: int | None, exact: bool) -> str:
    if n is None:
        return "-"
    return f"{n:,}" if exact else f"{n / 1e6:.3f}M"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="hypernetworks params", description=description(__doc__),
        epilog="Columns: 'total' counts every parameter of the model. 'paper convention' is derived, not "
               "counted: the paper's rounded plain-net figure (WRN 40-1 563,000, WRN 40-2 2,236,000), less "
               "'generated', plus 'hypernetwork'.")
    p.add_argument("pattern", nargs="?", default=None, help="glob over model names, e.g. '*wrn*'")
    p.add_argument("--millions", action="store_true", help="print counts in millions instead of exactly")
    args = p.parse_args(argv)
    names = list_models(args.pattern)
    if not names:
        print(f"no registered model matches {args.pattern!r}; known: {', '.join(list_models())}")
        return 1
    reports = {n: model_report(n) for n in names}
    groups = sorted({g for r in reports.values() for g in r} - set(_FIRST) - set(_LAST))
    cols = [*_FIRST, *groups, *[c for c in _LAST if any(c in r for r in reports.values())]]
    rows = [["model", *(_TITLES.get(c, c) for c in cols)]] + [[n, *(_fmt(r.get(c), not args.millions) for c in cols)] for n, r in reports.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols) + 1)]
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

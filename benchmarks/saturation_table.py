"""The saturation analysis as numbers: how much of each model's last-layer h_t and c_t sits near the
limits while it reads a passage (the shares that docs/char_lm.md quotes beside the histograms).

    HYPERNETWORKS_DATA=/path/to/data python benchmarks/saturation_table.py \\
        runs/tables/ptb-small-{lstm,ln-lstm,hyperlstm,ln-hyperlstm}/checkpoints/last.ckpt \\
        --chars 1500 --record results/tables/saturation-ptb-small.json

The passage is the first ``--chars`` characters of PTB's validation split (``--text-file`` for
another text); characters outside a model's vocabulary are dropped, as the picture's command does
(``python -m hypernetworks.viz.saturation``, the same states).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def shares(checkpoints: list[str], text: str) -> list[dict]:
    from hypernetworks.viz.saturation import checkpoint_states

    return [{"model": name, "checkpoint": ckpt, "h_above_0.95": float((h.abs() > 0.95).float().mean()),
             "c_beyond_5": float((c.abs() > 5).float().mean()), "values": int(h.numel())}
            for name, ckpt, h, c in checkpoint_states(checkpoints, text)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--text-file", default=None, help="the passage's file (default: the data folder's ptb/ptb.valid.txt)")
    p.add_argument("--chars", type=int, default=1500, help="characters to read (default 1500)")
    p.add_argument("--record", default=None, metavar="PATH", help="write the table as a record at PATH")
    args = p.parse_args(argv)
    from hypernetworks.data.root import data_root

    text_file = args.text_file or str(data_root() / "ptb" / "ptb.valid.txt")
    text = Path(text_file).read_text(encoding="utf-8")[: args.chars]
    rows = shares(args.checkpoints, text)
    from records import emit_table

    emit_table(["model", "share of abs(h_t) > 0.95", "share of abs(c_t) > 5"],
               [[r["model"], f"{r['h_above_0.95']:.1%}", f"{r['c_beyond_5']:.1%}"] for r in rows], args.record,
               title=f"last-layer states while reading the first {args.chars} characters of {Path(text_file).name}",
               values={"rows": rows, "chars": args.chars, "text_file": Path(text_file).name})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

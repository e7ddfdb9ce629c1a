"""``hypernetworks translate --checkpoint X [--beam 5] < input.txt``: one translation per input line.

The checkpoint carries its SentencePiece model, so no data folder is needed. Empty input lines
give empty output lines, so the output stays line-aligned with the input.
"""
from __future__ import annotations

import argparse
import sys

from hypernetworks.commands import description


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hypernetworks translate", description=description(__doc__))
    p.add_argument("--checkpoint", required=True, help="a TranslationTask checkpoint (.ckpt)")
    p.add_argument("--beam", type=int, default=5, help="beam size; 1 = greedy (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences decoded together (default 32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = p.parse_args(argv)
    if args.beam < 1:
        p.error(f"--beam must be >= 1, got {args.beam}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")

    from hypernetworks.training import load_task

    try:
        task = load_task(args.checkpoint, map_location=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"hypernetworks translate: {e}", file=sys.stderr)
        return 2
    if not hasattr(task, "translate") or getattr(task, "tokenizer", None) is None:
        print(f"hypernetworks translate: {args.checkpoint} is not a translation checkpoint with a tokenizer",
              file=sys.stderr)
        return 2
    lines = [line.rstrip("\r\n") for line in sys.stdin]
    for out in task.translate(lines, beam=args.beam, batch_size=args.batch_size):
        sys.stdout.write(out.replace("\n", " ") + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``hypernetworks sample CHECKPOINT``: generate from a trained checkpoint.

Text tasks (the char LM) print the sampled text; any other task with ``demo_generate`` (e.g. the
handwriting model) prints its JSON. Deterministic under ``--seed``.

    hypernetworks sample runs/ptb-small-hyperlstm/checkpoints/last.ckpt --prime "the " --temperature 0.8
"""
from __future__ import annotations

import argparse
import json
import sys

from hypernetworks.commands import description


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hypernetworks sample", description=description(__doc__))
    p.add_argument("checkpoint", help="a .ckpt written by hypernetworks fit or hypernetworks demo")
    p.add_argument("--length", type=int, default=300, help="steps to generate (default 300)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; same seed, same text (default 0)")
    p.add_argument("--prime", default="", help="text the model reads before generating")
    p.add_argument("--json", action="store_true", help="print the JSON the demo page gets (text and per-gate intensities)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.length < 0:
        raise SystemExit("hypernetworks sample: --length must be >= 0")
    if args.temperature <= 0:
        raise SystemExit("hypernetworks sample: --temperature must be positive")
    from hypernetworks.training import load_task

    try:
        task = load_task(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"hypernetworks sample: {e}") from None
    if hasattr(task, "sample") and not args.json:
        sys.stdout.write(args.prime + task.sample(args.length, args.temperature, args.seed, args.prime) + "\n")
        return 0
    if not hasattr(task, "demo_generate"):
        raise SystemExit(f"hypernetworks sample: {type(task).__name__} cannot generate")
    out = task.demo_generate(length=args.length, temperature=args.temperature, seed=args.seed, prime=args.prime)
    print(json.dumps(out))
    return 0

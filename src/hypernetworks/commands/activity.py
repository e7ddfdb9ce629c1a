"""``hypernetworks activity CHECKPOINT``: the weight-activity picture (HTML + PNG) of a char LM.

Either a passage sampled from the model (default) or a given text read by it (``--text``): each
character is shaded by how much the HyperLSTM changed the main LSTM's four hidden-to-gate scaling
vectors at that step, one colour per gate.

    hypernetworks activity runs/demo/hyperlstm/checkpoints/last.ckpt --out runs/demo --length 500
    hypernetworks activity CKPT --text "the meaning of life is" --out runs/pictures
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hypernetworks.commands import description


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hypernetworks activity", description=description(__doc__))
    p.add_argument("checkpoint", help="a char LM .ckpt with a HyperLSTM (hypernetworks fit or demo)")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's run directory)")
    p.add_argument("--stem", default="activity", help="file name stem (default activity)")
    p.add_argument("--text", default=None, help="read this text instead of sampling")
    p.add_argument("--length", type=int, default=400, help="sampled characters (default 400)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature of the sampling (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--prime", default="", help="text the model reads before sampling (default none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.length <= 0 or args.temperature <= 0:
        raise SystemExit("hypernetworks activity: --length and --temperature must be positive")
    from hypernetworks.training import load_task
    from hypernetworks.viz.activity import render_activity

    try:
        task = load_task(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"hypernetworks activity: {e}") from None
    if not hasattr(task, "activity_of"):
        raise SystemExit(f"hypernetworks activity: {type(task).__name__} is not a character language model")
    if args.text is not None:
        try:
            steps, intensity = task.activity_of(args.text)
        except ValueError as e:
            raise SystemExit(f"hypernetworks activity: {e}") from None
    else:
        out = task.demo_generate(length=args.length, temperature=args.temperature, seed=args.seed, prime=args.prime)
        steps, intensity = out["steps"], out["intensity"]
    cell = task.hparams.get("cell", "?")
    title = f"{cell} ({task.hparams.get('hidden_size')} units) weight activity"
    if "hyper" not in str(cell):
        title += " (not a HyperLSTM: no d_h, all zero)"
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent
    html_path, png_path = render_activity(steps, intensity, out_dir, stem=args.stem, title=title)
    print(f"{html_path}\n{png_path}")
    return 0

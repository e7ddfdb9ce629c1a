"""``hypernetworks handwriting CHECKPOINT``: sample handwriting from a trained checkpoint to SVG and PNG.

    hypernetworks handwriting runs/iam-hyperlstm-cpu/checkpoints/last.ckpt --out samples/hw \\
        --length 700 --bias 0.5 --seed 0 --num 3 --gates

writes ``samples/hw-0.svg``, ``samples/hw-0.png``, ... (``--gates`` colours every pen step by the
HyperLSTM's per-gate weight-change intensity; plain LSTM checkpoints are drawn in black).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hypernetworks.commands import description


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hypernetworks handwriting", description=description(__doc__))
    p.add_argument("checkpoint", help="a checkpoint of hypernetworks.tasks.handwriting.HandwritingTask")
    p.add_argument("--out", default="handwriting", help="output prefix (default: %(default)s)")
    p.add_argument("--length", type=int, default=700, help="pen steps per sample (default: %(default)s)")
    p.add_argument("--bias", type=float, default=None,
                   help="Graves' sampling bias, >= 0 (default: the checkpoint's sample_bias)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample k uses seed + k")
    p.add_argument("--num", type=int, default=1, help="number of samples (default: %(default)s)")
    p.add_argument("--gates", action="store_true", help="colour pen steps by per-gate weight-change intensity")
    p.add_argument("--format", choices=("svg", "png", "both"), default="both",
                   help="files to write per sample (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.length < 1 or args.num < 1:
        raise SystemExit("hypernetworks handwriting: --length and --num must be >= 1")
    if args.temperature <= 0 or (args.bias is not None and args.bias < 0):
        raise SystemExit("hypernetworks handwriting: need --temperature > 0 and --bias >= 0")
    import torch

    from hypernetworks.tasks.handwriting import HandwritingTask
    from hypernetworks.training import load_task
    from hypernetworks.viz.handwriting import save_png, save_svg

    try:
        task = load_task(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"hypernetworks handwriting: {e}") from None
    if not isinstance(task, HandwritingTask):
        raise SystemExit(f"hypernetworks handwriting: {args.checkpoint} holds a {type(task).__name__}, "
                         "not a HandwritingTask")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for k in range(args.num):
        steps, intensity = task.generate(args.length, bias=args.bias, temperature=args.temperature,
                                         seed=args.seed + k, activity=args.gates)
        if args.gates and intensity is None:
            print(f"note: {task.hparams.model} is not a HyperLSTM; drawing without gate colours")
        rnn = task.model.rnn
        title = f"{task.model.cell} {rnn.num_layers}x{rnn.hidden_size}, bias {args.bias}, seed {args.seed + k}"
        with torch.no_grad():
            if args.format in ("svg", "both"):
                print(save_svg(steps, f"{args.out}-{k}.svg", intensity, title=title))
            if args.format in ("png", "both"):
                print(save_png(steps, f"{args.out}-{k}.png", intensity, title=title))
    return 0

"""CHAMMI's own score for a trained checkpoint (1-nearest-neighbour macro-F1 per sub-dataset task).

    python benchmarks/chammi_benchmark.py runs/chammi-hypernet-vit-s16/checkpoints/last.ckpt \
        [--root <data root>/chammi] [--img-size 224] [--out scores.json]

Features are the model's class-token outputs on every image of Allen (WTC-11), HPA and CP;
``hypernetworks.data.multichannel.chammi_benchmark`` scores them as the MorphEm benchmark does.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hypernetworks.data.images import default_data_root
from hypernetworks.tasks.channels import evaluate_chammi
from hypernetworks.training import load_task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--root", default=None, help="CHAMMI folder (default <data root>/chammi)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=None, help="write the scores as JSON here")
    args = p.parse_args(argv)
    task = load_task(args.checkpoint)
    root = args.root or str(default_data_root() / "chammi")
    scores = evaluate_chammi(task.model, root, img_size=args.img_size, batch_size=args.batch_size)
    print("| sub-dataset | task | n | accuracy | macro-F1 |\n|---|---|---:|---:|---:|")
    for sub, tasks in scores.items():
        for task_name, s in tasks.items():
            print(f"| {sub} | {task_name} | {s['n']} | {100 * s['accuracy']:.2f} | {100 * s['f1_macro']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(scores, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

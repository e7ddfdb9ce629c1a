"""CHAMMI's own score for a trained checkpoint (1-nearest-neighbour macro-F1 per task, and the aggregates).

    python benchmarks/chammi_benchmark.py runs/chammi-hypernet-vit-s16/checkpoints/last.ckpt \
        [--root <data root>/chammi] [--img-size 224] [--out scores.json]

Features are the model's class-token outputs on every image of Allen (WTC-11), HPA and CP;
``hypernetworks.tasks.chammi_metrics.chammi_benchmark`` scores them as the MorphEm benchmark does
(a 1-NN classifier fitted on the Train rows; HPA Task_three and CP Task_four held out group by
group) and ``chammi_aggregate`` gives:

* the CHAMMI score as the published training code logs it (``score_f1`` in CHAMMI's and DiChaViT's
  ``trainer.py``): the mean macro-F1 over MorphEm's 9 result rows after the first, i.e. of every
  task but WTC-11's Task_one;
* per sub-dataset, the in-distribution task (Task_one) and the mean over its other tasks.

``hypernetworks test`` on a CHAMMI recipe logs the same numbers (``chammi/...``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hypernetworks.data.images import default_data_root
from hypernetworks.tasks.chammi_metrics import chammi_aggregate
from hypernetworks.tasks.channels import evaluate_chammi
from hypernetworks.training import load_task

SUB_NAMES = {"Allen": "WTC-11 (Allen)", "HPA": "HPA", "CP": "CP"}


def format_scores(scores: dict, aggregate: dict) -> str:
    lines = ["| sub-dataset | task | n | accuracy | macro-F1 |", "|---|---|---:|---:|---:|"]
    for sub, tasks in scores.items():
        for task_name, s in tasks.items():
            lines.append(f"| {SUB_NAMES.get(sub, sub)} | {task_name} | {s['n']} | {100 * s['accuracy']:.2f} | "
                         f"{100 * s['f1_macro']:.2f} |")
    lines += ["", "| aggregate | macro-F1 |", "|---|---:|"]
    if "score_f1" in aggregate:
        lines.append(f"| CHAMMI score (published code's score_f1: mean of the 8 tasks after WTC-11 Task_one) | "
                     f"{100 * aggregate['score_f1']:.2f} |")
    for sub in scores:
        if f"{sub}/id_f1" in aggregate:
            lines.append(f"| {SUB_NAMES.get(sub, sub)}, Task_one (in distribution) | {100 * aggregate[f'{sub}/id_f1']:.2f} |")
        if f"{sub}/ood_f1" in aggregate:
            lines.append(f"| {SUB_NAMES.get(sub, sub)}, mean of the other tasks | {100 * aggregate[f'{sub}/ood_f1']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--root", default=None, help="CHAMMI folder (default <data root>/chammi)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=None, help="write the scores and aggregates as JSON here")
    args = p.parse_args(argv)
    task = load_task(args.checkpoint)
    root = args.root or str(default_data_root() / "chammi")
    scores = evaluate_chammi(task.model, root, img_size=args.img_size, batch_size=args.batch_size)
    aggregate = chammi_aggregate(scores)
    print(format_scores(scores, aggregate))
    if args.out:
        Path(args.out).write_text(json.dumps({"tasks": scores, "aggregate": aggregate}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""CHAMMI's benchmark score (Chen et al., 2023; the MorphEm evaluation package): a 1-nearest-neighbour
classifier on a model's features, macro-F1 per task, and the aggregate the published code logs.

* ``chammi_benchmark(features, rows, sub_dataset)``: MorphEm's evaluation of one sub-dataset.
* ``chammi_aggregate({sub: {task: scores}})``: the benchmark's aggregate over its 9 tasks
  (``score_f1``, see there) plus, per sub-dataset, the in-distribution task (Task_one) and the mean
  over its other tasks.

``ChannelClassifier`` calls both at the end of ``hypernetworks test`` on CHAMMI
(``CHAMMIDataModule(benchmark=True)``); ``benchmarks/chammi_benchmark.py`` scores a checkpoint.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hypernetworks.data.chammi import CHAMMI_SPLITS, CHAMMI_TASKS, in_split

__all__ = ["chammi_benchmark", "chammi_aggregate", "CHAMMI_LEAVE_OUT", "CHAMMI_BENCHMARK_TASKS"]

# CHAMMI's out-of-distribution tasks scored by leaving out one group at a time (MorphEm benchmark).
CHAMMI_LEAVE_OUT = {"Allen": None, "HPA": ("Task_three", "cell_type"), "CP": ("Task_four", "Plate")}
# The benchmark's 9 (sub-dataset, task) rows in the order MorphEm's run_benchmark reports them.
CHAMMI_BENCHMARK_TASKS = [(sub, task) for sub in ("Allen", "HPA", "CP") for task in CHAMMI_TASKS[sub]]


def _nearest_neighbour(train_x: Tensor, train_y: Tensor, test_x: Tensor, chunk: int = 4096) -> Tensor:
    """1-nearest-neighbour (Euclidean) labels of ``test_x``."""
    out = [train_y[torch.cdist(test_x[k:k + chunk], train_x).argmin(1)] for k in range(0, len(test_x), chunk)]
    return torch.cat(out) if out else train_y.new_zeros(0)


def _macro_f1(pred: Tensor, truth: Tensor) -> float:
    """F1 averaged over the labels present in ``truth`` (as CHAMMI scores with sklearn's
    ``f1_score(labels=unique(truth), average="macro")``)."""
    f1 = []
    for c in truth.unique():
        tp = int(((pred == c) & (truth == c)).sum())
        fp = int(((pred == c) & (truth != c)).sum())
        fn = int(((pred != c) & (truth == c)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(sum(f1) / len(f1)) if f1 else float("nan")


def chammi_benchmark(features: Tensor, rows: list[dict[str, str]], sub_dataset: str,
                     tasks: list[str] | None = None) -> dict[str, dict[str, float]]:
    """CHAMMI's evaluation of one sub-dataset: ``features`` (one per metadata row in ``rows``) are
    classified by a 1-nearest-neighbour classifier fitted on the Train rows, for every task split
    (``tasks``; default: every task value of ``train_test_split`` among the rows, in the
    benchmark's order); a leave-out task (HPA Task_three by cell type, CP Task_four by plate)
    instead classifies each group with a classifier fitted on Train plus the task's other groups.
    ``rows`` may be a subset of the file (the Train rows and those of ``tasks``). Returns
    ``{task: {"accuracy", "f1_macro", "n"}}``; CHAMMI's headline is the macro-F1."""
    if len(features) != len(rows):
        raise ValueError(f"{len(features)} feature rows for {len(rows)} metadata rows")
    if sub_dataset not in CHAMMI_LEAVE_OUT:
        raise ValueError(f"sub_dataset must be one of {list(CHAMMI_LEAVE_OUT)}, got {sub_dataset!r}")
    x = features.float()
    codes: dict[str, int] = {}
    y = torch.tensor([codes.setdefault(r["Label"], len(codes)) for r in rows])
    if tasks is None:
        tasks = list(dict.fromkeys(r["train_test_split"] for r in rows if r["train_test_split"] != "Train"))
    bad = [t for t in tasks if t not in CHAMMI_SPLITS[1:]]
    if bad:
        raise ValueError(f"unknown CHAMMI tasks {bad}; tasks are among {CHAMMI_SPLITS[1:]}")
    tasks = sorted(tasks, key=CHAMMI_SPLITS.index)
    train = torch.tensor([r["train_test_split"] == "Train" for r in rows])
    leave = CHAMMI_LEAVE_OUT[sub_dataset]
    out = {}
    for task in tasks:
        member = torch.tensor([in_split(r, task) for r in rows])
        if leave is not None and task == leave[0]:
            groups = [r.get(leave[1]) for r in rows]
            if any(g in (None, "") for g, m in zip(groups, member.tolist()) if m):
                raise ValueError(f"{sub_dataset} {task}: rows without the leave-out column {leave[1]!r}")
            preds, truths = [], []
            for g in dict.fromkeys(g for g, m in zip(groups, member.tolist()) if m):
                held = member & torch.tensor([gg == g for gg in groups])
                fit = train | (member & ~held)
                preds.append(_nearest_neighbour(x[fit], y[fit], x[held]))
                truths.append(y[held])
            pred, truth = torch.cat(preds), torch.cat(truths)
        else:
            pred, truth = _nearest_neighbour(x[train], y[train], x[member]), y[member]
        out[task] = {"accuracy": float((pred == truth).float().mean()) if len(truth) else float("nan"),
                     "f1_macro": _macro_f1(pred, truth), "n": int(len(truth))}
    return out



def chammi_aggregate(scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """The aggregates of ``{sub_dataset: {task: {"accuracy", "f1_macro", ...}}}``:

    * ``score_f1`` / ``score_acc``: what the published training code logs as its CHAMMI score
      (``score_f1`` in CHAMMI's ``channel_adaptive_models/trainer.py`` and in DiChaViT's
      ``trainer.py``): the mean over MorphEm's result rows -- Allen Task_one, Task_two; HPA
      Task_one..three; CP Task_one..four -- *after the first*, i.e. of the 8 tasks other than
      WTC-11's Task_one. Only when all 9 tasks were scored.
    * ``<sub>/id_f1``: the sub-dataset's Task_one macro-F1 (in-distribution); ``<sub>/ood_f1``: the
      mean macro-F1 of its other tasks, when all of them were scored.

    Values are fractions (0..1)."""
    out: dict[str, float] = {}
    have = [(s, t) for s, t in CHAMMI_BENCHMARK_TASKS if t in scores.get(s, {})]
    if len(have) == len(CHAMMI_BENCHMARK_TASKS):
        rest = CHAMMI_BENCHMARK_TASKS[1:]
        out["score_f1"] = sum(scores[s][t]["f1_macro"] for s, t in rest) / len(rest)
        out["score_acc"] = sum(scores[s][t]["accuracy"] for s, t in rest) / len(rest)
    for sub, tasks in CHAMMI_TASKS.items():
        got = scores.get(sub, {})
        if "Task_one" in got:
            out[f"{sub}/id_f1"] = got["Task_one"]["f1_macro"]
        if all(t in got for t in tasks[1:]):
            out[f"{sub}/ood_f1"] = sum(got[t]["f1_macro"] for t in tasks[1:]) / len(tasks[1:])
    return out

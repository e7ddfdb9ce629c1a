"""Short-budget comparison tables: train each row's recipe with ``hypernetworks fit`` (one torch
thread, seed 0), read its metrics, and write the table's record under ``results/tables/``
(``benchmarks/records.py``), from which ``benchmarks/report.py`` rebuilds the pages' tables.

    HYPERNETWORKS_DATA=/path/to/data python benchmarks/recipe_table.py run ptb-small
    HYPERNETWORKS_DATA=/path/to/data python benchmarks/recipe_table.py run mnist-cpu iam-cpu
    python benchmarks/recipe_table.py list

Runs go to ``runs/tables/<table>-<row>/``; a row whose run finished is not trained again (delete
its folder to rerun it). The record holds every row's raw metric, parameter count and wall time.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import conditions, write_record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    config: str
    overrides: tuple[str, ...] = ()
    paper: str = ""
    seed: int = 0


@dataclass(frozen=True)
class Table:
    title: str
    rows: list[Row]
    metric: str                     # logged metric read from the run
    metric_column: str
    test: bool = False              # evaluate a checkpoint with `hypernetworks test`
    test_ckpt: str = "best"         # "best" (by validation) or "last" (the end of training)
    fmt: str = "{:.3f}"
    paper_column: str | None = None
    at_steps: tuple[int, ...] = ()  # report the metric at these steps (one column each), not only the last
    validate_args: tuple[str, ...] = ()  # also `hypernetworks validate` last.ckpt with these arguments ...
    validate_column: str = ""            # ... and report its `metric` in this column
    also: tuple[tuple[str, str], ...] = ()  # (logged metric, column): its last value (e.g. from the test run)


_PTB_SMALL = [
    Row("lstm", "LSTM 128", "configs/ptb-small-lstm.yaml", paper="1.347"),
    Row("lstm-wide", "LSTM 180 (HyperLSTM's parameter count)", "configs/ptb-small-lstm.yaml",
        ("--model.init_args.hidden_size", "180")),
    Row("ln-lstm", "LN LSTM 128", "configs/ptb-small-ln-lstm.yaml", paper="1.300"),
    Row("hyperlstm", "HyperLSTM 128", "configs/ptb-small-hyperlstm.yaml", paper="1.296"),
    Row("ln-hyperlstm", "LN HyperLSTM 128", "configs/ptb-small-ln-hyperlstm.yaml", paper="1.281"),
]
_AT = "valid bpc @{}"
TABLES: dict[str, Table] = {
    "ptb-small": Table(
        "Character-level PTB, 128 units, 400 steps of 32 x 100 characters, seed 0", _PTB_SMALL,
        metric="val_bpc", metric_column=_AT, at_steps=(200, 400),
        paper_column="paper valid bpc (1000 units, converged)"),
    "ptb-small-checks": Table(
        "Character-level PTB, LSTM 128 with a larger learning rate or a looser clip, 400 steps, seed 0",
        [Row("lstm-lr5e-3", "LSTM 128, lr 5e-3 instead of 2e-3", "configs/ptb-small-lstm.yaml",
             ("--model.init_args.lr", "0.005")),
         Row("lstm-clip5", "LSTM 128, gradient clip 5 instead of 1", "configs/ptb-small-lstm.yaml",
             ("--trainer.gradient_clip_val", "5.0"))],
        metric="val_bpc", metric_column=_AT, at_steps=(200, 400)),
    "ptb-small-emb": Table(
        "Character-level PTB, 128 units with a learned 64-d input embedding, 400 steps, seed 0",
        [Row(r.key, r.label + ", 64-d embedding", r.config, r.overrides + ("--model.init_args.embedding_dim", "64"))
         for r in _PTB_SMALL if r.key != "lstm-wide"],
        metric="val_bpc", metric_column=_AT, at_steps=(200, 400)),
    "ptb-small-1200": Table(
        "Character-level PTB, 128 units, 1,200 steps (validation every 400), seed 0",
        [Row(r.key, r.label, r.config, ("--trainer.max_steps", "1200", "--trainer.val_check_interval", "400"))
         for r in _PTB_SMALL if r.key in ("lstm", "hyperlstm")],
        metric="val_bpc", metric_column=_AT, at_steps=(400, 800, 1200)),
    "iam-cpu": Table(
        "IAM-OnDB handwriting, 2,000 training lines cut to 150 steps, 500 Adam steps, hidden 128, hyper 32, seed 0 "
        "unless a row says otherwise",
        [Row("lstm", "LSTM 128", "configs/iam-lstm-cpu.yaml", paper="-1,055"),
         Row("lstm-seed1", "LSTM 128, seed 1", "configs/iam-lstm-cpu.yaml", seed=1),
         Row("lstm-wide", "LSTM 151 (HyperLSTM's parameter count)", "configs/iam-lstm-cpu.yaml",
             ("--model.init_args.model_overrides", "{hidden_size: 151, hyper_size: 32, embedding_size: 4}")),
         Row("ln-lstm", "LN LSTM 128", "configs/iam-lstm-cpu.yaml",
             ("--model.init_args.model", "iam-ln-lstm-900"), paper="-1,096"),
         Row("hyperlstm", "HyperLSTM 128", "configs/iam-hyperlstm-cpu.yaml", paper="-1,162"),
         Row("hyperlstm-seed1", "HyperLSTM 128, seed 1", "configs/iam-hyperlstm-cpu.yaml", seed=1),
         Row("ln-hyperlstm", "LN HyperLSTM 128", "configs/iam-hyperlstm-cpu.yaml",
             ("--model.init_args.model", "iam-ln-hyperlstm-900"), paper="-1,067")],
        metric="val_loss", metric_column="val log-loss, 150 steps", fmt="{:.1f}", paper_column="paper (900 units)",
        validate_args=("--data.max_len", "null"), validate_column="val log-loss, full lines"),
    "multi30k": Table(
        "Multi30k En->Fr, 2+2 layers of 128 with additive attention, 600 steps of 128 sentences (about 2.6 "
        "epochs), seed 0; test_2016_flickr, beam 5, last checkpoint",
        [Row(key, label, f"configs/multi30k-gnmt-{cfg}.yaml", ("--trainer.max_steps", "600") + extra)
         for key, label, cfg, extra in (
             ("lstm", "LSTM", "lstm", ()),
             ("lstm-wide", "LSTM 156 (LN HyperLSTM's parameter count)", "lstm",
              ("--model.init_args.model_args", "{hidden_size: 156}")),
             ("ln-lstm", "LN LSTM", "ln-lstm", ()),
             ("hyperlstm", "HyperLSTM (hyper 32, N_z 8)", "hyperlstm", ()),
             ("ln-hyperlstm", "LN HyperLSTM (hyper 32, N_z 8)", "ln-hyperlstm", ()))],
        metric="val_ppl", metric_column="val ppl @{}", at_steps=(300, 600), fmt="{:.1f}", test=True,
        test_ckpt="last", also=(("test_bleu", "test BLEU @600"),)),
    "cifar10-smoke": Table(
        "CIFAR-10, WRN 40-1 and Hyper WRN 40-1, 1,500 steps of batch 64 (about 2 epochs), seed 0; validation on "
        "1,000 class-balanced test images during training, then the whole test set from the last checkpoint",
        [Row("hyper", "hyper-wrn-40-1", "configs/cifar10-hyper-wrn-40-1-cpu.yaml"),
         Row("wrn", "wrn-40-1", "configs/cifar10-wrn-40-1-cpu.yaml")],
        metric="val_acc", metric_column="val accuracy @{}", at_steps=(500, 1000, 1500), fmt="{:.1%}", test=True,
        test_ckpt="last", also=(("test_acc", "test accuracy (10,000 images)"),)),
    "cifar10-init": Table(
        "CIFAR-10, Hyper WRN 40-2, the first 100 steps of batch 64 with each initialisation, seed 0 (same batches); "
        "validation on 1,000 class-balanced test images",
        [Row("match", "per-layer init (`init=\"match\"`, the default)", "configs/cifar10-hyper-wrn-40-2-cpu.yaml"),
         Row("generator", "earlier init (`init=\"generator\"`)", "configs/cifar10-hyper-wrn-40-2-tileinit-cpu.yaml")],
        metric="val_acc", metric_column="val accuracy @{}", at_steps=(50, 100), fmt="{:.1%}",
        also=(("val_loss", "val loss @100"),)),
    "mnist-cpu": Table(
        "MNIST, static hypernetwork, 5 epochs of batch 100, seed 0",
        [Row("hyper", "mnist-hyper (layer 2 generated, N_z 4)", "configs/mnist-hyper-cpu.yaml", paper="0.76%"),
         Row("conv", "mnist-conv", "configs/mnist-conv-cpu.yaml", paper="0.72%")],
        metric="test_acc", metric_column="test error (ours)", test=True, test_ckpt="last", fmt="{:.2%}",
        paper_column="paper test error"),
}


def _metrics(run_dir: Path) -> list[dict]:
    rows = []
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(f, newline="") as fh:
            rows += [{k: v for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(fh)]
    return rows


def _params(ckpt: Path) -> int:
    import torch

    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    # tied weights (a shared embedding and output layer) appear under two names but share storage: count once
    seen = {(v.untyped_storage().data_ptr(), v.storage_offset(), v.numel()): v.numel()
            for k, v in sd.items() if v.dtype.is_floating_point and "running_" not in k}
    return int(sum(seen.values()))


def run_row(name: str, table: Table, row: Row, runs_root: Path, log_dir: Path) -> dict:
    run_name = f"{name}-{row.key}"
    run_dir = runs_root / run_name
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    common = ["--config", row.config, *row.overrides, "--seed_everything", str(row.seed), "--runs_root", str(runs_root),
              "--run_name", run_name, "--trainer.enable_progress_bar", "false"]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{run_name}.log"
    done = run_dir / "finished"
    t0 = time.time()
    load0 = conditions()["load_average_at_start"]
    if not done.is_file():
        cmd = [sys.executable, "-m", "hypernetworks.cli", "fit", *common]
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            if subprocess.call(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT) != 0:
                raise SystemExit(f"{run_name}: fit failed, see {log}")
        done.write_text(json.dumps({"fit_wall_s": round(time.time() - t0, 1), "load_average_at_start": load0,
                                    "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}) + "\n")
    run_info = json.loads(done.read_text())
    ckpts = sorted((run_dir / "checkpoints").glob("best-*.ckpt"), key=lambda p: int(p.stem.split("=")[-1]))
    last = run_dir / "checkpoints" / "last.ckpt"
    if table.test:
        cmd = [sys.executable, "-m", "hypernetworks.cli", "test", *common, "--ckpt_path",
               str(last if table.test_ckpt == "last" else (ckpts or [last])[-1])]
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            if subprocess.call(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT) != 0:
                raise SystemExit(f"{run_name}: test failed, see {log}")
    validated = None
    if table.validate_args:
        cmd = [sys.executable, "-m", "hypernetworks.cli", "validate", *common, "--ckpt_path", str(last),
               *table.validate_args, "--trainer.logger", "false"]
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}")
        found = re.findall(rf"\b{table.metric}\b[^-0-9]+(-?[0-9][0-9.eE+-]*)", out.stdout)
        if out.returncode != 0 or not found:
            raise SystemExit(f"{run_name}: validate failed or printed no {table.metric}, see {log}")
        validated = float(found[-1])
    rows = [r for r in _metrics(run_dir) if table.metric in r]
    if not rows:
        raise SystemExit(f"{run_name}: no {table.metric} logged, see {log}")
    # a validation after step s is logged at step s - 1 (Lightning's step of the last logged batch)
    at = {s: float(r[table.metric]) for s in table.at_steps for r in rows if int(float(r["step"])) in (s - 1, s)}
    missing = [s for s in table.at_steps if s not in at]
    if missing:
        raise SystemExit(f"{run_name}: no {table.metric} logged at steps {missing}, see {log}")
    also = {}
    for metric, _ in table.also:
        logged = [r for r in _metrics(run_dir) if metric in r]
        if not logged:
            raise SystemExit(f"{run_name}: no {metric} logged, see {log}")
        also[metric] = float(logged[-1][metric])
    return {"value": float(rows[-1][table.metric]), "step": int(float(rows[-1].get("step", 0))), "at_steps": at,
            "also": also,
            "params": _params(last), **run_info, "run": str(run_dir), "overrides": list(row.overrides),
            "validated": validated}


def _also_fmt(metric: str, value: float) -> str:
    if metric.endswith("acc"):
        return f"{value:.1%}"
    return f"{value:.2f}" if "bleu" in metric else f"{value:.3f}"


def cmd_run(a) -> int:
    for name in a.tables:
        table = TABLES[name]
        results = {row.key: run_row(name, table, row, Path(a.runs_root), Path(a.runs_root) / "logs") for row in table.rows}
        loads = [r["load_average_at_start"][0] for r in results.values() if r.get("load_average_at_start")]
        started = {"torch_threads": 1, "runs_finished": sorted({r["finished"] for r in results.values()})[-1],
                   "load_average_at_run_starts": f"{min(loads):g} to {max(loads):g}" if loads else None}
        metric_columns = [table.metric_column.format(s) for s in table.at_steps] or [table.metric_column]
        metric_columns += [table.validate_column] if table.validate_args else []
        metric_columns += [column for _, column in table.also]
        columns = ["model", "params", *metric_columns] + ([table.paper_column] if table.paper_column else [])
        out_rows = []
        for row in table.rows:
            r = results[row.key]
            vals = ([r["at_steps"][s] for s in table.at_steps] or [r["value"]]) + (
                [r["validated"]] if table.validate_args else [])
            vals = [1 - v for v in vals] if table.metric == "test_acc" else vals  # mnist-cpu reports error
            out_rows.append([row.label, f"{r['params']:,}", *(table.fmt.format(v) for v in vals),
                             *(_also_fmt(m, r["also"][m]) for m, _ in table.also)] +
                            ([row.paper] if table.paper_column else []))
        path = write_record(REPO / "results" / "tables" / f"{name}.json", name=name, title=table.title,
                            columns=columns, rows=out_rows, values=results, started=started,
                            extra_conditions={"seed": ", ".join(sorted({str(r.seed) for r in table.rows}))})
        print(f"wrote {path.relative_to(REPO)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the rows of these tables and write their records")
    r.add_argument("tables", nargs="+", choices=sorted(TABLES))
    r.add_argument("--runs_root", default="runs/tables")
    r.set_defaults(fn=cmd_run)
    ls = sub.add_parser("list", help="the tables and their rows")
    ls.set_defaults(fn=lambda a: print("\n".join(f"{n}: {t.title} ({', '.join(r.key for r in t.rows)})"
                                                 for n, t in TABLES.items())) or 0)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())

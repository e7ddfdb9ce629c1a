"""Converged-at-CPU-scale study: run the paper's comparisons to a plateau, keep a small
record of every run under ``results/``, and rebuild the tables and learning-curve pictures from
those records alone.

    python benchmarks/converged_study.py run    --study ptb [--workers 2]   # queue, resumable
    python benchmarks/converged_study.py report [--results results] [--out docs]

``run`` trains every (cell, seed) of a study with ``hypernetworks fit`` (one torch thread each, at
most ``--workers`` at a time), resuming a cut-off run from its ``last.ckpt`` and skipping finished
ones, then evaluates the best checkpoint on the whole test split with ``hypernetworks test``. Each
finished run leaves ``results/<study>/<cell>/seed<k>/`` holding ``config.yaml`` (as run),
``metrics.csv`` (every logged validation), ``final.json`` (seed, test metric, parameters, epochs,
steps, wall time, status). A run whose fit fails (a non-finite loss, say) is recorded with
``status: "failed"`` and the reason, not silently dropped. Checkpoints stay in ``runs/study/``.

``report`` reads only ``results/`` and writes ``results/<study>/TABLE.md`` plus one PNG per study
(validation metric against step and against wall time, one thin line per seed).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import textwrap
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Cell:
    key: str
    label: str
    config: str
    seeds: tuple[int, ...]
    # (study, cell) whose run this one continues by exact resume: same recipe but a later epoch cap
    continues: tuple[str, str] | None = None


def _continued(src: str, cells: list[Cell], config) -> list[Cell]:
    """The same cells and seeds, each continuing its run of study ``src`` under ``config(key)``: the
    same recipe with a later epoch cap."""
    return [dataclasses.replace(c, config=config(c.key), continues=(src, c.key)) for c in cells]


# Seeds: >= 3 for the widened LSTM and the LN HyperLSTM, >= 2 for the others.
PTB_CELLS = [
    Cell("lstm", "LSTM 128", "configs/study/ptb-lstm.yaml", (0, 1)),
    Cell("lstm-wide", "LSTM 180 (LN HyperLSTM's parameter count)", "configs/study/ptb-lstm-wide.yaml", (0, 1, 2)),
    Cell("ln-lstm", "LN LSTM 128", "configs/study/ptb-ln-lstm.yaml", (0, 1, 2)),
    Cell("hyperlstm", "HyperLSTM 128", "configs/study/ptb-hyperlstm.yaml", (0, 1, 2)),
    Cell("ln-hyperlstm", "LN HyperLSTM 128", "configs/study/ptb-ln-hyperlstm.yaml", (0, 1, 2)),
]
EMB_CELLS = [
    Cell("emb-ln-lstm", "LN LSTM 128, 64-d embedding", "configs/study/ptb-emb-ln-lstm.yaml", (0,)),
    Cell("emb-hyperlstm", "HyperLSTM 128, 64-d embedding", "configs/study/ptb-emb-hyperlstm.yaml", (0,)),
]
_BPC = dict(metric="test_bpc", val_metric="val_bpc", lower_is_better=True, unit="bpc")
STUDIES: dict[str, dict] = {
    "ptb": dict(_BPC, title="Character-level PTB, 128 units, 4-epoch cap", cells=PTB_CELLS),
    "ptb-embedding": dict(_BPC, title="Character-level PTB with a learned 64-d input embedding, 4-epoch cap",
                          cells=EMB_CELLS),
    "ptb-long": dict(
        _BPC, title="Character-level PTB, 128 units, 12-epoch cap (4-epoch runs continued by exact resume)",
        cells=_continued("ptb", PTB_CELLS, lambda k: f"configs/study/ptb-long-{k}.yaml")),
    "ptb-plateau": dict(
        _BPC, title="Character-level PTB, 128 units, to the plateau: 12-epoch runs continued by exact resume until "
                    "early stopping (1.5 epochs without a 0.002 improvement; 30-epoch cap)",
        cells=_continued("ptb-long", PTB_CELLS, lambda k: f"configs/study/ptb-plateau-{k}.yaml")),
    "ptb-embedding-plateau": dict(
        _BPC, title="Character-level PTB with a learned 64-d input embedding, to the plateau: 4-epoch runs "
                    "continued by exact resume until early stopping (30-epoch cap)",
        cells=_continued("ptb-embedding", EMB_CELLS,
                         lambda k: f"configs/study/ptb-emb-plateau-{k.removeprefix('emb-')}.yaml")),
    # The plain LSTMs' plateau under ptb-plateau's schedule (rate halved at every validation without a
    # 0.002 gain) came at rates of 1e-5; this study trains from scratch with patience 2 and a 1e-4 floor
    "ptb-schedule": dict(
        _BPC, title="Character-level PTB, 128 units, schedule check: from scratch, learning rate halved after 3 "
                    "validations without a 0.002 improvement (floor 1e-4), early stopping after 3 epochs "
                    "without one (30-epoch cap)",
        # the LN cells joined once seed 0 changed the order of HyperLSTM and LSTM 180 (the check's rule)
        cells=[dataclasses.replace(c, config=f"configs/study/ptb-schedule-{c.key}.yaml", seeds=(0, 1, 2))
               for c in PTB_CELLS]),
    "mnist": dict(
        metric="test_error", val_metric="val_acc", lower_is_better=True, unit="error",
        title="MNIST, second conv layer generated vs plain, 8 epochs",
        cells=[
            Cell("conv", "plain conv net", "configs/study/mnist-conv.yaml", (0, 1)),
            Cell("hyper", "layer 2 generated (N_z 4)", "configs/study/mnist-hyper.yaml", (0, 1)),
        ]),
}


# Runs of ptb-schedule that reach the 30-epoch cap still improving continue here (exact resume)
STUDIES["ptb-schedule-long"] = dict(
    _BPC, title="Character-level PTB, 128 units, schedule check continued to a 60-epoch cap (exact resume of the "
                "30-epoch runs)",
    cells=_continued("ptb-schedule", STUDIES["ptb-schedule"]["cells"],
                     lambda k: f"configs/study/ptb-schedule-long-{k}.yaml"))


# ----------------------------------------------------------------------------- running

def _run_dir(runs_root: Path, study: str, cell: Cell, seed: int) -> Path:
    return runs_root / f"{study}-{cell.key}-seed{seed}"


def _record_dir(results: Path, study: str, cell: Cell, seed: int) -> Path:
    return results / study / cell.key / f"seed{seed}"


def _hn(*args: str) -> list[str]:
    return [sys.executable, "-m", "hypernetworks.cli", *args]


def _merged_metrics(run_dir: Path) -> list[dict]:
    """Rows of every csv/version_*/metrics.csv (a resumed run starts a new version); a step
    logged twice (repeated after a resume) keeps the latest version's row."""
    rows: dict[tuple, dict] = {}
    versions = sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for v in versions:
        f = v / "metrics.csv"
        if not f.is_file():
            continue
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                filled = {k: val for k, val in r.items() if val not in ("", None)}
                key = (filled.get("step"), tuple(sorted(k for k in filled if k not in ("step", "epoch"))))
                rows[key] = filled
    return sorted(rows.values(), key=lambda r: (int(float(r.get("step", 0))), sorted(r)))


def _params_of(ckpt: Path) -> int:
    import torch

    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return int(sum(v.numel() for k, v in sd.items() if v.dtype.is_floating_point and "running_" not in k))


def _chain_dirs(runs_root: Path, study: str, cell: Cell, seed: int) -> list[Path]:
    """The run folder of (study, cell, seed) and those of the shorter runs it continues."""
    dirs = [_run_dir(runs_root, study, cell, seed)]
    while cell.continues:
        study, key = cell.continues
        cell = next(c for c in STUDIES[study]["cells"] if c.key == key)
        dirs.append(_run_dir(runs_root, study, cell, seed))
    return dirs


def best_checkpoint(dirs: list[Path], rows: list[dict], val_metric: str, higher_is_better: bool = False) -> Path | None:
    """The ``best-step=N.ckpt`` (in any of ``dirs``, the run first) of the validation with the best
    ``val_metric`` among ``rows`` (the whole run's metrics, continued segments included) that has
    a checkpoint; ``None`` if no validation has one."""
    files: dict[int, Path] = {}
    for d in reversed(dirs):  # the run's own copy wins over its source's
        for f in (d / "checkpoints").glob("best-*.ckpt"):
            files[int(f.stem.split("=")[-1])] = f
    scored = [(float(r[val_metric]), int(float(r["step"]))) for r in rows
              if r.get(val_metric) not in (None, "") and math.isfinite(float(r[val_metric]))]
    # a checkpoint is named after the global step at which it was saved: the logged step, or one past it
    candidates = [(v, files.get(step) or files.get(step + 1)) for v, step in scored]
    candidates = [(v, f) for v, f in candidates if f is not None]
    if not candidates:
        return None
    return (max if higher_is_better else min)(candidates, key=lambda c: c[0])[1]


def run_one(study: str, cell: Cell, seed: int, runs_root: Path, results: Path, data_root: str | None,
            log_dir: Path) -> str:
    rec = _record_dir(results, study, cell, seed)
    if (rec / "final.json").is_file():
        return f"{rec}: done already"
    run_dir = _run_dir(runs_root, study, cell, seed)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if data_root:
        env["HYPERNETWORKS_DATA"] = data_root
    common = ["--config", cell.config, "--seed_everything", str(seed), "--runs_root", str(runs_root),
              "--run_name", run_dir.name]
    last = run_dir / "checkpoints" / "last.ckpt"
    if cell.continues and not run_dir.exists():
        # start from the shorter run's state (its checkpoints and logs); resuming is exact, so this
        # equals training the longer recipe from scratch with the same seed
        src_study, src_key = cell.continues
        src = next(c for c in STUDIES[src_study]["cells"] if c.key == src_key)
        src_dir = _run_dir(runs_root, src_study, src, seed)
        if not (src_dir / "checkpoints" / "last.ckpt").is_file():
            return f"{rec}: waiting for {src_dir} (run study {src_study!r} first)"
        # its best checkpoint comes along, and the checkpoint callback keeps its score (a moved
        # folder), so a continuation without a new best keeps the source's best model
        shutil.copytree(src_dir, run_dir, ignore=shutil.ignore_patterns("tb"))
    fit = _hn("fit", *common, *(["--ckpt_path", "last"] if last.is_file() else []))
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{run_dir.name}.log"
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(fit)}\n")
        fh.flush()
        rc = subprocess.call(fit, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    info: dict = dict(study=study, cell=cell.key, label=cell.label, seed=seed, config=cell.config)
    def bests(d: Path) -> list[Path]:
        return sorted((d / "checkpoints").glob("best-*.ckpt"), key=lambda p: int(p.stem.split("=")[-1]))

    spec = STUDIES[study]
    best = best_checkpoint(_chain_dirs(runs_root, study, cell, seed), _merged_metrics(run_dir), spec["val_metric"],
                           higher_is_better=spec["val_metric"].endswith("acc"))
    best = [best] if best is not None else []
    if rc != 0 or not best:
        tail = log.read_text().splitlines()[-15:]
        info.update(status="failed", returncode=rc, reason="\n".join(tail))
    else:
        test = _hn("test", *common, "--ckpt_path", str(best[-1]))
        with open(log, "a") as fh:
            fh.write(f"\n$ {' '.join(test)}\n")
            fh.flush()
            rc = subprocess.call(test, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if rc != 0:
            info.update(status="failed", returncode=rc, reason="test failed:\n" + "\n".join(log.read_text().splitlines()[-15:]))
        else:
            info["status"] = "ok"
    rows = _merged_metrics(run_dir)
    rec.mkdir(parents=True, exist_ok=True)
    # the configuration of the last segment: the one that ran (a continuation changes the epoch cap)
    configs = sorted((run_dir / "csv").glob("version_*/config.yaml"), key=lambda p: int(p.parent.name.split("_")[1]))
    configs = configs or sorted(run_dir.glob("**/config.yaml"), key=lambda p: p.stat().st_mtime)
    if configs:
        shutil.copy(configs[-1], rec / "config.yaml")
    fit_rows = [r for r in rows if not any(k.startswith("test_") for k in r)]
    with open(rec / "metrics.csv", "w", newline="") as fh:
        keys = sorted({k for r in fit_rows for k in r}, key=lambda k: (k not in ("step", "epoch"), k))
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(fit_rows)
    vals = [(int(float(r["step"])), float(r[spec["val_metric"]])) for r in fit_rows if spec["val_metric"] in r]
    walls = [float(r["wall_s"]) for r in fit_rows if "wall_s" in r]
    tests = [r for r in rows if any(k.startswith("test_") for k in r)]
    if info["status"] == "ok":
        t = tests[-1]
        info.update({k: float(v) for k, v in t.items() if k.startswith("test_")})
        info["best_checkpoint_step"] = int(best[-1].stem.split("=")[-1])
        info["params"] = _params_of(best[-1])
    epochs = [float(r["epoch"]) for r in fit_rows if "epoch" in r]
    info.update(
        validations=len(vals), steps=max((s for s, _ in vals), default=0),
        epochs=(max(epochs) + 1) if epochs else 0,
        best_val=(max if spec["val_metric"].endswith("acc") else min)((v for _, v in vals), default=None),
        train_wall_s=walls[-1] if walls else None, session_wall_s=round(time.time() - t0, 1),
        torch_threads=1, finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    (rec / "final.json").write_text(json.dumps(info, indent=2) + "\n")
    return f"{rec}: {info['status']} {info.get(spec['metric'])}"


def cmd_run(a) -> int:
    studies = list(STUDIES) if a.study == "all" else a.study.split(",")
    jobs = []
    for s in studies:
        cells = STUDIES[s]["cells"]
        # round-robin over seeds so that the minimum seeds of every cell finish first
        if a.cells:
            cells = [c for c in cells if c.key in a.cells.split(",")]
        if a.seeds:  # e.g. a new seed, to check that it lands within the reported spread
            cells = [dataclasses.replace(c, seeds=tuple(int(k) for k in a.seeds.split(","))) for c in cells]
        for seed in sorted({k for c in cells for k in c.seeds}):
            jobs += [(s, c, seed) for c in cells if seed in c.seeds]
    with ThreadPoolExecutor(a.workers) as pool:
        futs = [pool.submit(run_one, s, c, k, Path(a.runs_root), Path(a.results), a.data_root, Path(a.log_dir))
                for s, c, k in jobs]
        for f in futs:
            print(f.result(), flush=True)
    return 0


# ----------------------------------------------------------------------------- reporting

def _load(results: Path, study: str) -> list[dict]:
    out = []
    for f in sorted((results / study).glob("*/seed*/final.json")):
        info = json.loads(f.read_text())
        with open(f.parent / "metrics.csv", newline="") as fh:
            info["_rows"] = list(csv.DictReader(fh))
        out.append(info)
    return out


def _fmt(xs: list[float], digits: int, scale: float = 1.0) -> str:
    if not xs:
        return "n/a"
    m = statistics.fmean(xs) * scale
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(xs) * scale:.{digits}f}"


def table(results: Path, study: str) -> str:
    spec = STUDIES[study]
    runs = _load(results, study)
    metric, pct = spec["metric"], spec["unit"] == "error"
    head = f"test {'error (%)' if pct else spec['unit']}"
    lines = [f"| model | seeds | params | {head} (mean ± std) | epochs | wall time per run (min) | failed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for cell in spec["cells"]:
        rs = [r for r in runs if r["cell"] == cell.key]
        ok = [r for r in rs if r.get("status") == "ok"]
        if not rs:
            continue
        vals = [r[metric] for r in ok]
        params = sorted({r["params"] for r in ok})
        lines.append(
            f"| {cell.label} | {len(ok)} ({', '.join(str(r['seed']) for r in ok)}) | "
            f"{', '.join(f'{p:,}' for p in params) or 'n/a'} | "
            f"{_fmt(vals, 2 if pct else 3, 100.0 if pct else 1.0)} | "
            f"{_fmt([r['epochs'] for r in ok], 1)} | "
            f"{_fmt([r['train_wall_s'] / 60 for r in ok if r.get('train_wall_s')], 0)} | "
            f"{len(rs) - len(ok)} |")
    return "\n".join(lines) + "\n"


def separation(results: Path, study: str, a: str, b: str) -> str:
    """How far apart two cells' test metrics are, in pooled standard deviations."""
    spec = STUDIES[study]
    runs = [r for r in _load(results, study) if r.get("status") == "ok"]
    xa = [r[spec["metric"]] for r in runs if r["cell"] == a]
    xb = [r[spec["metric"]] for r in runs if r["cell"] == b]
    if len(xa) < 2 or len(xb) < 2:
        return f"{a} vs {b}: too few seeds"
    diff = statistics.fmean(xb) - statistics.fmean(xa)
    pooled = math.sqrt((statistics.variance(xa) + statistics.variance(xb)) / 2)
    return f"{a} vs {b}: difference {diff:+.4f}, {abs(diff) / pooled if pooled else float('inf'):.1f} pooled std"


def curves(results: Path, study: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = STUDIES[study]
    runs = _load(results, study)
    vm = spec["val_metric"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, cell in enumerate(spec["cells"]):
        for j, r in enumerate(x for x in runs if x["cell"] == cell.key):
            rows = [row for row in r["_rows"] if row.get(vm)]
            steps = [int(float(row["step"])) for row in rows]
            vals = [float(row[vm]) for row in rows]
            walls = [float(row["wall_s"]) / 60 for row in rows if row.get("wall_s")]
            kw = dict(color=colours[i % len(colours)], lw=1, alpha=0.8, label=cell.label if j == 0 else None)
            axes[0].plot(steps, vals, **kw)
            if len(walls) == len(vals):
                axes[1].plot(walls, vals, **kw)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training wall time (min, one torch thread, shared 2-core CPU)")
    axes[0].set_ylabel(f"validation {vm.split('_', 1)[1]}")
    axes[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(spec["title"] + " (one thin line per seed)", 120), fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"study-{study}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_report(a) -> int:
    results, out = Path(a.results), Path(a.out)
    for study in STUDIES:
        if not (results / study).is_dir():
            continue
        text = f"## {STUDIES[study]['title']}\n\n{table(results, study)}"
        if study in ("ptb", "ptb-long", "ptb-plateau", "ptb-schedule", "ptb-schedule-long"):
            pairs = [("ln-hyperlstm", "hyperlstm"), ("hyperlstm", "lstm"), ("ln-hyperlstm", "lstm-wide"),
                     ("hyperlstm", "lstm-wide"), ("ln-hyperlstm", "ln-lstm")]
            text += "\n" + "\n".join(f"- {separation(results, study, x, y)}" for x, y in pairs) + "\n"
        if study == "mnist":
            text += "\n- " + separation(results, study, "conv", "hyper") + "\n"
        (results / study / "TABLE.md").write_text(text)
        print(text)
        if a.pictures:
            print("picture:", curves(results, study, out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the runs of a study that have no record yet (resumes cut-off runs)")
    r.add_argument("--study", default="all", help=f"one of {sorted(STUDIES)}, comma-separated, or 'all'")
    r.add_argument("--seeds", default=None,
                   help="comma-separated seeds instead of each cell's own (run the studies of a chain in order, "
                        "with --workers 1: a continuation waits for the shorter run of its seed)")
    r.add_argument("--cells", default=None, help="only these cells (comma-separated keys)")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--runs_root", default="runs/study")
    r.add_argument("--results", default="results")
    r.add_argument("--log_dir", default="runs/study/logs")
    r.add_argument("--data_root", default=os.environ.get("HYPERNETWORKS_DATA"),
                   help="the data root the recipes read (default: $HYPERNETWORKS_DATA)")
    r.set_defaults(fn=cmd_run)
    q = sub.add_parser("report", help="rebuild TABLE.md files and the curve pictures from results/ alone")
    q.add_argument("--results", default="results")
    q.add_argument("--out", default="docs")
    q.add_argument("--no-pictures", dest="pictures", action="store_false")
    q.set_defaults(fn=cmd_report)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())

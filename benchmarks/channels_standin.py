"""The CIFAR-10 stand-in comparison of channel-adaptive ViTs (docs/channels.md).

    python benchmarks/channels_standin.py run [NAME ...]   # fit + test each recipe, one at a time
    python benchmarks/channels_standin.py report            # table (markdown) + docs/channels.png

``run`` trains each ``configs/cifar10-channels-*-cpu.yaml`` recipe through the project's
command line (``hypernetworks fit`` then ``test`` on ``last.ckpt``), one thread, and records
under ``results/channels/<recipe>.json`` the test accuracy on every channel subset, the parameter
counts, the wall time and the machine's load average (and the resolved fit configuration as
``<recipe>.fit-config.yaml``); a recipe already recorded is skipped.
``report`` rebuilds the table and the figure from those records only.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import statistics
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "channels"
RECIPES = [
    "cifar10-channels-hypernet-vit-cpu",
    "cifar10-channels-fixed-vit-cpu",
    "cifar10-channels-channelvit-cpu",
    "cifar10-channels-hypernet-vit-meta-cpu",
    "cifar10-channels-loo-green-hypernet-vit-cpu",
    "cifar10-channels-loo-green-hypernet-vit-meta-cpu",
]
SUBSETS = ["red", "green", "blue", "red+green", "red+blue", "green+blue", "red+green+blue"]
LABEL = {
    "cifar10-channels-hypernet-vit-cpu": "HyperNet ViT (learned embeddings)",
    "cifar10-channels-hypernet-vit-meta-cpu": "HyperNet ViT (metadata)",
    "cifar10-channels-fixed-vit-cpu": "ViT (zero-fill + rescale)",
    "cifar10-channels-channelvit-cpu": "ChannelViT",
    "cifar10-channels-loo-green-hypernet-vit-cpu": "no green in training: learned + mean init",
    "cifar10-channels-loo-green-hypernet-vit-meta-cpu": "no green in training: metadata",
}


def _test_metrics(run_dir: Path) -> dict[str, float]:
    """The test metrics of the newest CSV log that has them."""
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]),
                    reverse=True):
        rows = list(csv.DictReader(open(f)))
        out = {k: float(v) for r in rows for k, v in r.items() if k.startswith("test_") and v not in ("", None)}
        if out:
            return out
    raise RuntimeError(f"no test metrics under {run_dir}/csv")


def _params(recipe: Path) -> dict[str, int]:
    import yaml

    from hypernetworks.models.registry import create_model
    from hypernetworks.nn.static import parameter_report

    args = yaml.safe_load(recipe.read_text())["model"]["init_args"]
    return parameter_report(create_model(args["model"], **(args.get("model_args") or {})))


def run_name(name: str, seed: int = 0, max_steps: int | None = None) -> str:
    """The run's (and its record's) name: the recipe's, with ``-seed<k>`` for seeds other than the
    recipes' 0 and ``-steps<n>`` for a changed step budget (the compute-matched runs)."""
    return name + (f"-steps{max_steps}" if max_steps else "") + (f"-seed{seed}" if seed else "")


def run(names: list[str], test_limit_per_class: int | None = None, test_only: bool = False, seed: int = 0,
        max_steps: int | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for recipe_name in names or RECIPES:
        name = run_name(recipe_name, seed, max_steps)
        out = RESULTS / f"{name}.json"
        old = json.loads(out.read_text()) if out.exists() else None
        if old is not None and not test_only:
            print(f"{name}: recorded already ({out})")
            continue
        recipe = ROOT / "configs" / f"{recipe_name}.yaml"
        cli = [sys.executable, "-m", "hypernetworks.cli"]
        common = ["--config", str(recipe), "--run_name", name, "--seed_everything", str(seed)]
        if max_steps:
            common += ["--trainer.max_steps", str(max_steps)]
        ckpt = ROOT / "runs" / name / "checkpoints" / "last.ckpt"
        load0, t0 = os.getloadavg(), time.time()
        if test_only:
            if not ckpt.is_file():
                raise SystemExit(f"{name}: --test-only needs {ckpt}")
        else:
            subprocess.run([*cli, "fit", *common], check=True, env=env, cwd=ROOT)
            versions = sorted((ROOT / "runs" / name / "csv").glob("version_*/config.yaml"),
                              key=lambda p: int(p.parent.name.split("_")[1]))
            if versions:  # the fully resolved configuration the fit ran with
                (RESULTS / f"{name}.fit-config.yaml").write_text(versions[-1].read_text())
        t1 = time.time()
        test = [*cli, "test", *common, "--ckpt_path", str(ckpt)]
        if test_limit_per_class:  # the first N test images of each class (the fit used the full data)
            test += ["--data.limit_per_class", str(test_limit_per_class)]
        subprocess.run(test, check=True, env=env, cwd=ROOT)
        t2 = time.time()
        n_test = 10 * test_limit_per_class if test_limit_per_class else 10000
        record = {
            "recipe": f"configs/{recipe_name}.yaml", "label": LABEL.get(recipe_name, recipe_name), "seed": seed,
            "max_steps": max_steps or yaml.safe_load(recipe.read_text())["trainer"]["max_steps"],
            "test": _test_metrics(ROOT / "runs" / name), "test_images": n_test,
            "test_set": (f"the first {test_limit_per_class} test images of each class" if test_limit_per_class
                         else "the full CIFAR-10 test set"),
            "params": _params(recipe), "command": " ".join(["python", "benchmarks/channels_standin.py", *sys.argv[1:]]),
            "fit_seconds": old["fit_seconds"] if test_only else round(t1 - t0, 1), "test_seconds": round(t2 - t1, 1),
            "load_average_start": [round(x, 2) for x in load0],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "machine": f"{os.cpu_count()} CPU cores, one torch thread (OMP_NUM_THREADS=1)",
            "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        }
        if old is not None and old.get("test_images", 10000) != n_test:
            record["earlier_test"] = {"test_images": old.get("test_images", 10000), "test": old["test"]}
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{name}: {record['test']}")


def _mean(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.fmean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def table(records: dict[str, dict]) -> str:
    """One row per recipe and step budget: accuracy per channel subset averaged over its seeds, and
    the mean over the subsets as mean ± std over seeds."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for name, r in records.items():
        recipe = Path(r["recipe"]).stem
        steps = r.get("max_steps") or yaml.safe_load((ROOT / r["recipe"]).read_text())["trainer"]["max_steps"]
        groups.setdefault((recipe, steps), []).append(r)
    order = sorted(groups, key=lambda k: (RECIPES.index(k[0]) if k[0] in RECIPES else 99, -k[1]))
    lines = ["| model | params | steps | seeds | test images | " + " | ".join(s.replace("+", " + ") for s in SUBSETS)
             + " | mean over subsets |", "|---|---:|---:|---:|---:|" + "---:|" * (len(SUBSETS) + 1)]
    for key in order:
        rs = sorted(groups[key], key=lambda r: r.get("seed", 0))
        per_seed = [[r["test"].get(f"test_acc/{s}") for s in SUBSETS] for r in rs]
        cells = []
        for i in range(len(SUBSETS)):
            vals = [accs[i] for accs in per_seed if accs[i] is not None]
            cells.append(f"{100 * statistics.fmean(vals):.1f}" if vals else "-")
        means = [statistics.fmean([a for a in accs if a is not None]) for accs in per_seed]
        images = sorted({r.get("test_images", 10000) for r in rs})
        lines.append(f"| {rs[0]['label']} | {rs[0]['params']['total']:,} | {key[1]:,} | "
                     f"{len(rs)} ({', '.join(str(r.get('seed', 0)) for r in rs)}) | "
                     f"{', '.join(f'{n:,}' for n in images)} | " + " | ".join(cells) + f" | {_mean(means)} |")
    return "\n".join(lines) + "\n"


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hypernetworks.viz.figures import save_figure

    records = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    if not records:
        raise SystemExit(f"no records in {RESULTS}; run `python {Path(__file__).name} run` first")
    print(table(records))
    records = {n: r for n, r in records.items() if n in RECIPES}  # the figure: seed 0 at the recipes' budget
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [4, 2]})
    groups = [("comparison (all three channels in training)", [n for n in RECIPES[:4] if n in records], axes[0]),
              ("leave green out of training", [n for n in RECIPES[4:] if n in records], axes[1])]
    for title, names, ax in groups:
        subsets = SUBSETS if "comparison" in title else ["green", "red+green", "green+blue", "red+green+blue", "red+blue"]
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            vals = [100 * records[name]["test"].get(f"test_acc/{s}", float("nan")) for s in subsets]
            ax.bar([i + j * width for i in range(len(subsets))], vals, width, label=records[name]["label"])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(subsets))])
        ax.set_xticklabels([s.replace("red", "R").replace("green", "G").replace("blue", "B").replace("+", "") for s in subsets])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("CIFAR-10 as a 3-channel stand-in: test accuracy per channel subset "
                 "(tiny ViTs on CPU; comparison 1,000 steps, leave-one-out 500)", fontsize=10)
    fig.tight_layout()
    print(f"wrote {save_figure(fig, ROOT / 'docs' / 'channels.png', dpi=110)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("names", nargs="*", help=f"recipes to run (default: {', '.join(RECIPES)})")
    r.add_argument("--test-limit-per-class", type=int, default=None,
                   help="test on the first N test images of each class (default: all 10,000)")
    r.add_argument("--test-only", action="store_true", help="re-test the run's last.ckpt and re-record it")
    r.add_argument("--seed", type=int, default=0, help="seed_everything (default 0, the recipes'); records of other "
                                                       "seeds are named <recipe>-seed<k>")
    r.add_argument("--max-steps", type=int, default=None,
                   help="another step budget (a compute-matched run); records are named <recipe>-steps<n>")
    sub.add_parser("report")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args.names, args.test_limit_per_class, args.test_only, args.seed, args.max_steps)
    else:
        report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

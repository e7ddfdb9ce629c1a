"""``hypernetworks demo``: train a small HyperLSTM and a same-size LSTM on the pydoc text.

Both models get the same seed, data order and step budget (Lightning Trainer; progress bars on a
terminal, a progress line every 30 s or so when the output goes to a file or a pipe); the command
prints each one's validation bits per character (whole validation split, state carried) and
parameter count, then writes the weight-activity picture (HTML + PNG) of a passage sampled from
the HyperLSTM. No download and no data folder: the text is CPython's ``pydoc_data.topics``. A run
replaces the demo already in its folder (checkpoints, logs, ``results.json``, pictures), so every
path it prints and records is its own. The figures repeat exactly on one machine and source tree;
another CPU can change them by up to about 0.015 bpc (``benchmarks/demo_spread.py`` measures it; README).

    hypernetworks demo                    # about a minute of CPU per model
    hypernetworks demo --quick            # seconds: a smoke run (in runs/demo-quick)
    hypernetworks demo --steps 600 --hidden-size 256 --run-dir runs/demo
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

from hypernetworks.commands import description


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hypernetworks demo", description=description(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="training steps per model (default 1000)")
    p.add_argument("--hidden-size", type=int, default=128, help="main LSTM units of both models (default 128)")
    p.add_argument("--hyper-size", type=int, default=32, help="hyper LSTM units of the HyperLSTM (default 32)")
    p.add_argument("--embedding-size", type=int, default=4, help="N_z of the HyperLSTM (default 4)")
    p.add_argument("--embedding-dim", type=int, default=0,
                   help="learned input embedding size for both models (default 0: one-hot input, as in the paper)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per training batch (default 32)")
    p.add_argument("--seq-len", type=int, default=64, help="characters per training sequence (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of both models' initialisation and data order (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small recurrent models gain nothing from more)")
    p.add_argument("--run-dir", default=None,
                   help="where checkpoints, logs and pictures go, replacing an earlier demo there "
                        "(default runs/demo; runs/demo-quick with --quick)")
    p.add_argument("--sample-length", type=int, default=400, help="characters in the activity picture")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 20 steps of a tiny model, in runs/demo-quick unless --run-dir is given")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bars (they show only when the output is a terminal anyway)")
    return p


def _train(cell: str, args, run_dir: Path):
    from lightning.pytorch import seed_everything

    from hypernetworks._console import interactive
    from hypernetworks.callbacks import ProgressLines
    from hypernetworks.data.text import PydocTextDataModule
    from hypernetworks.tasks.language_model import LanguageModelTask
    from hypernetworks.training import make_trainer

    seed_everything(args.seed, verbose=False)
    dm = PydocTextDataModule(batch_size=args.batch_size, seq_len=args.seq_len, eval_batch_size=32)
    task = LanguageModelTask(cell=cell, hidden_size=args.hidden_size, hyper_size=args.hyper_size,
                             embedding_size=args.embedding_size, embedding_dim=args.embedding_dim or None, lr=args.lr,
                             vocab=list(dm.vocab.symbols))
    trainer = make_trainer(
        run_dir / cell, LanguageModelTask, callbacks=[ProgressLines(label=cell)],
        max_steps=args.steps, val_check_interval=args.steps, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, gradient_clip_val=1.0, accelerator="cpu", devices=1,
        enable_progress_bar=not args.no_progress and interactive(), enable_model_summary=False,
        limit_val_batches=3 if args.quick else 1.0, log_every_n_steps=max(1, min(50, args.steps // 4)))
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    seconds = time.perf_counter() - t0
    # the file this run wrote (Lightning picks another name when one is in the way), named as the
    # run folder was given
    written = Path(trainer.checkpoint_callback.last_model_path or run_dir / cell / "checkpoints" / "last.ckpt")
    if not run_dir.is_absolute() and written.is_absolute() and written.is_relative_to(Path.cwd()):
        written = written.relative_to(Path.cwd())
    return task, {
        "cell": cell,
        "val_bpc": float(trainer.callback_metrics["val_bpc"]),
        "params": sum(p.numel() for p in task.parameters()),
        "seconds": round(seconds, 1),
        "checkpoint": str(written),
    }


MARKER = ".hypernetworks-demo"  # written into the run folder when a demo starts


def _clear_earlier_demo(run_dir: Path) -> bool:
    """Remove what an earlier demo wrote into ``run_dir`` (only the demo's own files: each model's
    checkpoints/, csv/ and tb/, results.json and the activity pictures), so that the folder holds
    this run alone: Lightning would otherwise write last-v1.ckpt beside the old last.ckpt, and the
    demo page would list both. Returns whether anything was removed.

    A folder is a demo's when it holds the demo's marker file or its results.json; a folder with
    ``hyperlstm/`` or ``lstm/`` checkpoints but neither (runs of another command) is left alone
    and the demo stops with a message instead."""
    import shutil

    cells = [run_dir / cell / sub for cell in ("hyperlstm", "lstm") for sub in ("checkpoints", "csv", "tb")]
    files = [run_dir / name for name in ("results.json", "activity.html", "activity.png", MARKER)]
    if not any(p.exists() for p in cells + files):
        return False
    if not ((run_dir / MARKER).is_file() or (run_dir / "results.json").is_file()):
        if any(p.is_dir() for p in cells):
            raise SystemExit(f"hypernetworks demo: {run_dir} holds runs that are not a demo's (no {MARKER} or "
                             "results.json); the demo replaces its folder, so choose another --run-dir")
        return False
    for folder in cells:
        if folder.is_dir():
            shutil.rmtree(folder)
    for f in files:
        if f.is_file():
            f.unlink()
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.run_dir is None:
        args.run_dir = "runs/demo-quick" if args.quick else "runs/demo"
    if args.quick:
        args.steps, args.hidden_size, args.hyper_size = min(args.steps, 20), 32, 16
        args.batch_size, args.seq_len, args.sample_length = 8, 32, min(args.sample_length, 120)
    for name in ("steps", "hidden_size", "hyper_size", "embedding_size", "batch_size", "seq_len", "threads",
                 "sample_length"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"hypernetworks demo: --{name.replace('_', '-')} must be positive")
    if args.embedding_dim < 0:
        raise SystemExit("hypernetworks demo: --embedding-dim must be >= 0")
    import torch

    import lightning.pytorch  # noqa: F401  (configures its loggers on import; the levels below must come after)

    from hypernetworks._console import quiet_lightning

    torch.set_num_threads(args.threads)
    # keep the terminal to the progress bars and the result table
    quiet_lightning()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    run_dir = Path(args.run_dir)
    if _clear_earlier_demo(run_dir):
        print(f"Replacing the earlier demo in {run_dir}.")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("written by hypernetworks demo: a rerun into this folder replaces it\n")
    print(f"Training a HyperLSTM and an LSTM ({args.hidden_size} units, {args.steps} steps of "
          f"{args.batch_size}x{args.seq_len} characters, seed {args.seed}) on the pydoc_data text ...", flush=True)
    results, tasks = [], {}
    for cell in ("hyperlstm", "lstm"):
        task, res = _train(cell, args, run_dir)
        tasks[cell] = task
        results.append(res)
    from hypernetworks.viz.activity import render_activity

    out = tasks["hyperlstm"].demo_generate(length=args.sample_length, temperature=0.8, seed=args.seed, prime="The ")
    html_path, png_path = render_activity(out["steps"], out["intensity"], run_dir, stem="activity",
                                          title=f"HyperLSTM ({args.hidden_size} units) sample, pydoc text, "
                                                f"{args.steps} steps")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"{'model':<12} {'params':>10} {'valid bpc':>10} {'train s':>8}")
    for r in results:
        print(f"{r['cell']:<12} {r['params']:>10,} {r['val_bpc']:>10.3f} {r['seconds']:>8.1f}")
    print()
    print("HyperLSTM sample (temperature 0.8):")
    print("".join(out["steps"])[:300])
    print()
    print(f"weight-activity picture: {html_path}  {png_path}")
    print(f"checkpoints: {results[0]['checkpoint']}  {results[1]['checkpoint']}")
    return 0

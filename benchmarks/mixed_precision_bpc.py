"""Does a short char-LM training run in bf16 mixed precision land where float32 lands?

    python benchmarks/mixed_precision_bpc.py                      # CPU, small LN HyperLSTM on PTB
    python benchmarks/mixed_precision_bpc.py --device cuda --precisions 32-true bf16-mixed 16-mixed

Trains the same model from the same seed (same initial weights, batches and dropout masks) once per
Lightning precision for ``--steps`` steps, then evaluates validation bpc on the first
``--val-batches`` batches of PTB's validation split with the precision it trained in, and prints a
table and the largest gap to the first precision (float32). Needs torch, Lightning and the PTB char
files in the data folder (``HYPERNETWORKS_DATA``, README). ``--out`` writes the results as JSON.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))


def train_one(precision: str, args) -> dict:
    import lightning.pytorch as pl

    from hypernetworks.data.text import PTBCharDataModule
    from hypernetworks.tasks.language_model import LanguageModelTask

    pl.seed_everything(args.seed, verbose=False)
    dm = PTBCharDataModule(root=args.data, batch_size=args.batch, seq_len=args.seq_len, eval_batch_size=args.batch)
    task = LanguageModelTask(cell=args.cell, hidden_size=args.hidden, hyper_size=args.hyper, embedding_size=4,
                             input_dropout=0.1, output_dropout=0.1, recurrent_dropout=0.1, lr=args.lr)
    trainer = pl.Trainer(accelerator=args.device, devices=1, precision=precision, max_steps=args.steps,
                         limit_val_batches=args.val_batches, val_check_interval=args.steps, gradient_clip_val=1.0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir="/tmp/mixed_precision_bpc")
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    seconds = time.perf_counter() - t0
    return {"precision": precision, "val_bpc": float(trainer.callback_metrics["val_bpc"]),
            "train_bpc": float(trainer.callback_metrics["train_bpc"]), "seconds": round(seconds, 1),
            "steps": trainer.global_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    p.add_argument("--cell", default="ln-hyperlstm")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--hyper", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--val-batches", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=None, help="folder with ptb.char.*.txt (default: the data folder's ptb/)")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    p.add_argument("--record", default=None, metavar="PATH",
                   help="write the table as a record (benchmarks/records.py) at PATH, e.g. "
                        "results/mixed-precision/ln-hyperlstm-seed0.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = None
    if args.record:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from records import conditions

        started = conditions(torch_threads=args.threads, device=args.device)
    rows = [train_one(prec, args) for prec in args.precisions]
    base = rows[0]["val_bpc"]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"\n{args.cell} hidden {args.hidden} hyper {args.hyper}, batch {args.batch} x {args.seq_len}, "
          f"{args.steps} steps, lr {args.lr}, seed {args.seed}; validation bpc on {args.val_batches} batches; "
          f"{where}; torch {torch.__version__}\n")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from records import emit_table

    emit_table(["precision", "val bpc", "- first", "train bpc (last step)", "seconds"],
               [[r["precision"], f"{r['val_bpc']:.4f}", f"{r['val_bpc'] - base:+.4f}", f"{r['train_bpc']:.3f}",
                 f"{r['seconds']:.0f}"] for r in rows], args.record,
               title=f"{args.cell} hidden {args.hidden} hyper {args.hyper}, batch {args.batch} x {args.seq_len}, "
                     f"{args.steps} steps, lr {args.lr}, seed {args.seed}; validation bpc on {args.val_batches} "
                     f"batches; {where}", started=started, values={"rows": rows, "args": vars(args)})
    gap = max(abs(r["val_bpc"] - base) for r in rows)
    print(f"\nlargest |val bpc - {rows[0]['precision']}|: {gap:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/mixed_precision_bpc.py", *(argv or sys.argv[1:])]),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": where},
            "args": vars(args), "rows": rows, "largest_gap": gap}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
